"""Config checks that fail at start with one clear message, before any data or model is built."""
from __future__ import annotations

import fcntl
import functools
import importlib.util
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ncu.choices import (ANCHORS, DETECTION_CUTS, DETECTION_SOURCES, DETECTORS, FLAGGED_CAPTIONS,
                         HN_CAPACITIES, NC_COUNTS, NEGATION_HEADS, NEGATION_MODES, NOISE_PROTOCOLS,
                         SHIFT_STYLES, SINKHORN_STOPS)
from ncu import objectives
from ncu.config_keys import check_added_keys
from ncu.errors import ConfigError, InputError  # noqa: F401 - the entry points import them from here

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
log = logging.getLogger(__name__)


def compose_config(overrides: Sequence[str] = (), config_name: str = "train",
                   return_hydra_config: bool = False) -> DictConfig:
    """The project's config composed outside a Hydra app (benchmarks, export, tests), Hydra left clean."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.instance().clear()


# What every method config holds (conf/method/_base.yaml): checked once, then read without fallbacks.
BASE_METHOD_KEYS = ("name", "nc_ratio", "nc_count", "detector", "detection.threshold", "detection.source",
                    "detection.momentum", "detection.cut", "negation.mode", "local_loss", "stages")
_ABSENT = object()


def plan_stages(cfg: DictConfig) -> list[tuple[str, dict]]:
    """The run's ordered stages ``[(name, settings)]``: pre-training (when enabled) then the method's."""
    defaults = OmegaConf.to_container(cfg.optim.stage_defaults, resolve=True)
    plan = []
    enabled = cfg.pretrain.enabled
    if enabled is True or (enabled == "auto" and cfg.model.pretrained is None):
        plan.append(("pretrain", {**defaults, **OmegaConf.to_container(cfg.pretrain.stage, resolve=True)}))
    for name, stage in cfg.method.stages.items():
        if stage is not None:  # method.stages.<name>=null drops a stage
            plan.append((name, {**defaults, **OmegaConf.to_container(stage, resolve=True)}))
    cap = cfg.get("epochs_cap")
    for _, stage in plan:
        if cap is not None and stage["epochs"] > cap:
            # a capped stage keeps the share of warm-up epochs before its detector acts (at least one epoch acts)
            if stage["flag_after"]:
                stage["flag_after"] = min(cap - 1, max(1, round(stage["flag_after"] * cap / stage["epochs"])))
            stage["epochs"] = cap
    return plan


def _local_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# What to pass for a value a config leaves unset (???).
MISSING_HINTS = {
    "data.path": "data=csv needs a CSV/TSV of pairs (data.path=/data/pairs.csv)",
    "data.shards": "data=wds needs tar shards, e.g. 'data.shards=\"/data/cc3m/{00000..00331}.tar\"'",
    "model.pretrained": "the checkpoint to start from (model.pretrained=<file>)",
}


def unset_keys(cfg: DictConfig) -> list[str]:
    """Dotted keys whose value is ``???``, read without resolving interpolations (which may need Hydra)."""
    out: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif node == "???":
            out.append(prefix)

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return sorted(out)


def _number(value: Any, key: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """``value`` is a finite number (an integer with ``integer``) inside the given bounds, else ConfigError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        kind = "an integer" if integer else "a number"
        bounds = "".join([f" {'>' if low_open else '>='} {low:g}" if low is not None else "",
                          " and" if low is not None and high is not None else "",
                          f" {'<' if high_open else '<='} {high:g}" if high is not None else ""])
        raise ConfigError(f"{key}={value!r} is invalid: it must be {kind}{bounds}")


def _choice(value: Any, key: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is unknown; choose from {', '.join(choices)}")


def validate(cfg: DictConfig) -> None:
    """Every value that can be checked without data or model, with a one-line ConfigError naming its key.

    Imports nothing heavy (no torch, open_clip or lightning): entry points call it first, so a typo costs
    seconds, not a model build."""
    check_added_keys(cfg)
    missing = unset_keys(cfg)
    if missing:
        also = f" (also not set: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise ConfigError(f"{missing[0]} is not set: {MISSING_HINTS.get(missing[0], f'pass {missing[0]}=<value>')}"
                          + also)
    _number(cfg.seed, "seed", integer=True)
    _validate_noise(cfg)
    _validate_model(cfg)
    _validate_data(cfg)
    _validate_method(cfg)
    _validate_solver(cfg)
    _validate_accumulation(cfg)
    if _local_multirun() and "ddp" in str(cfg.trainer.get("strategy")) and "SLURM_NTASKS" not in os.environ:
        raise ConfigError("trainer=ddp inside a local multirun: use hydra/launcher=slurm, or run the points one by one")
    plan = plan_stages(cfg)
    if not plan:
        raise ConfigError("the run has no stage: method.stages is empty and pre-training is off")
    for name, stage in plan:
        _validate_stage(name, stage)
    _warn_empty_quota(cfg, plan)


def _validate_accumulation(cfg: DictConfig) -> None:
    """Every objective here couples the batch (InfoNCE's negatives, the NC quota, the OT plan): Lightning's
    accumulation would compute it per micro-batch, a different method. optim.accum_freq keeps the whole batch."""
    _number(cfg.optim.accum_freq, "optim.accum_freq", low=1, integer=True)
    lightning_accum = cfg.trainer.get("accumulate_grad_batches") or 1
    if lightning_accum != 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={lightning_accum} would compute the objective per "
                          f"micro-batch (its negatives, NC quota and OT plan): use optim.accum_freq={lightning_accum}, "
                          "which computes it over the whole accumulated batch")
    if cfg.optim.accum_freq > 1 and cfg.trainer.get("gradient_clip_val") is not None:
        raise ConfigError("trainer.gradient_clip_val is not supported with optim.accum_freq > 1 (the module takes its "
                          "own optimizer steps); leave it null")


def _warn_empty_quota(cfg: DictConfig, plan: list[tuple[str, dict]]) -> None:
    """The per-batch quota flags k = floor(nc_ratio * batch) pairs of the global batch (``nc_count``, same
    rule; without torch): warn when that is 0 for a stage that acts on the flags, which then flags nothing."""
    method = cfg.method
    if method.detector != "batch":
        return
    acting = [name for name, stage in plan if stage["objective"] in objectives.flag_objectives()]
    ratio, batch = method.nc_ratio, cfg.data.batch_size * cfg.optim.accum_freq  # the batch the quota sees
    size = f"data.batch_size={cfg.data.batch_size}" + (
        f" x optim.accum_freq={cfg.optim.accum_freq}" if cfg.optim.accum_freq > 1 else "")
    k = int(ratio * batch) if method.nc_count == "truncate" else math.floor(ratio * batch + 1e-9)
    if acting and k == 0:
        _warn_once(f"method.nc_ratio={ratio:g} with {size} flags k = floor({ratio:g} x {batch}) = "
                   f"0 pairs per batch: stages {', '.join(acting)} flag nothing")


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    """Entry points and ``run.train`` both validate: say it once per process."""
    log.warning(message)


def _validate_noise(cfg: DictConfig) -> None:
    rate = cfg.noise.rate
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate < 1:
        raise ConfigError(f"noise.rate={rate!r} is invalid: it must be a number in [0, 1)")
    _choice(cfg.noise.protocol, "noise.protocol", NOISE_PROTOCOLS)
    _number(cfg.noise.get("seed", 0), "noise.seed", integer=True)
    if cfg.noise.get("n_clusters") is not None:
        _number(cfg.noise.n_clusters, "noise.n_clusters", low=1, integer=True)


def _validate_model(cfg: DictConfig) -> None:
    known = known_model_names()
    name = cfg.model.name
    if known is not None and name not in known and not str(name).startswith(("hf-hub:", "local-dir:")):
        small = sorted(n for n in known if n.startswith("ncu-"))
        raise ConfigError(f"unknown model.name {name!r}: not an open_clip architecture. Small ones shipped here: "
                          f"{small}; `python -c 'import open_clip; print(open_clip.list_models())'` lists the rest")
    pretrained = cfg.model.pretrained
    if pretrained is not None and ("/" in str(pretrained) or Path(str(pretrained)).suffix):
        if not Path(str(pretrained)).exists():
            raise ConfigError(f"model.pretrained={pretrained!r}: file not found")
    if cfg.model.get("logit_scale") is not None:  # .get: configs saved before the option existed
        # The clamp every stage applies (unless it sets clamp_logit_scale: false) keeps s at most 100.
        _number(cfg.model.logit_scale, "model.logit_scale", low=0, low_open=True, high=100)
        if pretrained is not None:
            raise ConfigError(f"model.logit_scale={cfg.model.logit_scale!r} sets the scale of a model built from "
                              f"scratch; model.pretrained={pretrained!r} brings its own (set model.logit_scale=null)")


def known_model_names() -> set[str] | None:
    """open_clip's architecture names (the configs it ships) and ours, read without importing open_clip;
    None when its config folder cannot be found (the model factory then checks the name)."""
    spec = importlib.util.find_spec("open_clip")
    folders = [Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])] if spec else []
    folders = [f for f in folders if f.is_dir()]
    if not folders:
        return None
    ours = Path(__file__).parent / "models" / "configs"
    return {p.stem for folder in [*folders, ours] for p in folder.glob("*.json")}


def _validate_resampling(data: DictConfig, spec: Any) -> None:
    weights = data.get("source_weights")
    if data.get("samples_per_epoch") is not None:
        _number(data.samples_per_epoch, "data.samples_per_epoch", low=1, integer=True)
    if weights is None:
        return
    if not data.get("resampled"):
        raise ConfigError("data.source_weights needs data.resampled=true (weighted sources are drawn with replacement)")
    n = 1 if isinstance(spec, str) else len(spec)
    if len(weights) != n or not all(isinstance(w, (int, float)) and w > 0 for w in weights):
        raise ConfigError(f"data.source_weights={list(weights)}: one positive weight per source of data.shards "
                          f"(a list of {n} shard spec(s))")


def _validate_data(cfg: DictConfig) -> None:
    data = cfg.data
    shifts = data.get("shifts") or []
    if shifts and data.get("source") != "scenes":
        raise ConfigError(f"data.shifts={list(shifts)}: the shifted styles redraw the scenes data (data=scenes); "
                          f"data.source={data.get('source')!r} has none: set data.shifts=[]")
    for style in shifts:
        _choice(style, "data.shifts", SHIFT_STYLES)
    if data.get("train_size") is not None and data.get("source") != "scenes":
        raise ConfigError(f"data.train_size={data.train_size!r} sizes the generated scenes (data=scenes); "
                          f"data.source={data.get('source')!r} is read as it is (data.limit subsamples it)")
    if data.get("train_size") is not None:
        _number(data.train_size, "data.train_size", low=1, integer=True)
    if cfg.noise.get("derangement") and cfg.noise.get("protocol") == "concept":
        raise ConfigError("noise.derangement=true moves captions between images; noise.protocol=concept keeps every "
                          "caption with its image (set noise.derangement=false)")
    if cfg.data.get("source") == "csv":
        path = OmegaConf.select(cfg, "data.path", throw_on_missing=False)
        if not path:
            raise ConfigError("data.path is not set: data=csv needs a CSV/TSV of pairs (data.path=/data/pairs.csv)")
        if not Path(path).is_file():
            raise ConfigError(f"data.path={path!r}: file not found (data=csv needs a CSV/TSV of pairs)")
        # Header and first row only: a wrong column name or an empty table fails here, before any image is read.
        import pandas as pd

        from ncu.data.sources import require_columns

        roles = {f"data.{r}": data.get(r) for r in ("image_key", "caption_key", "category_key", "key_key")}
        try:
            rows = require_columns(path, data.get("sep"), roles, sep_hint="set data.sep")
        except pd.errors.EmptyDataError:
            raise ConfigError(f"data.path={path!r}: the file is empty (a header row is needed)") from None
        except (ValueError, pd.errors.ParserError) as e:
            raise ConfigError(str(e)) from None  # names the file, the column, its data.* key and those found
        if not rows:
            raise ConfigError(f"data.path={path!r}: the table has a header but no data rows")
    elif cfg.data.get("source") == "wds":
        from ncu.data.shardlist import expand_shards, is_url

        spec = OmegaConf.select(cfg, "data.shards", throw_on_missing=False)
        shards = expand_shards(spec) if spec else []
        missing = [s for s in shards if not is_url(s) and not Path(s).is_file()]  # a URL is opened when read
        if not shards or missing:
            raise ConfigError(f"data.shards={spec!r}: {len(missing)} of {len(shards)} shards not found "
                              f"(e.g. {missing[:3]}); data=wds needs tar shards, "
                              "e.g. 'data.shards=\"/data/cc3m/{00000..00331}.tar\"'")
        _validate_resampling(data, spec)
    batch = data.batch_size
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 2:
        raise ConfigError(f"data.batch_size={batch!r} is invalid: contrastive training needs an integer >= 2")
    _number(data.get("eval_batch_size", 1), "data.eval_batch_size", low=1, integer=True)
    _number(data.get("num_workers", 0), "data.num_workers", low=0, integer=True)
    fracs = {k: data.get(k) for k in ("val_frac", "test_frac") if data.get(k) is not None}
    for key, value in fracs.items():
        _number(value, f"data.{key}", low=0, high=1, high_open=True)
    if sum(fracs.values()) >= 1:
        raise ConfigError(f"data.val_frac + data.test_frac = {sum(fracs.values()):g} leaves no training data")
    for key in ("limit", "eval_max_pairs"):
        if data.get(key) is not None:
            _number(data.get(key), f"data.{key}", low=1, integer=True)


def _validate_method(cfg: DictConfig) -> None:
    method = cfg.method
    missing = [k for k in BASE_METHOD_KEYS if OmegaConf.select(method, k, default=_ABSENT) is _ABSENT]
    if missing:
        raise ConfigError(f"method {method.get('name')!r} has no {', '.join('method.' + k for k in missing)}: a method "
                          "file starts from another (defaults: [_base], [clip] or [ncu]), which holds every default")
    _number(method.nc_ratio, "method.nc_ratio", low=0, high=1, high_open=True)
    _choice(method.detector, "method.detector", DETECTORS)
    _choice(method.nc_count, "method.nc_count", NC_COUNTS)
    detection = method.detection
    _number(detection.threshold, "method.detection.threshold", low=0, high=1, low_open=True, high_open=True)
    _number(detection.momentum, "method.detection.momentum", low=0, high=1, high_open=True)
    _choice(detection.source, "method.detection.source", DETECTION_SOURCES)
    _choice(detection.cut, "method.detection.cut", DETECTION_CUTS)
    if method.get("gamma") is not None:
        _number(method.gamma, "method.gamma", low=0, high=1)
    band = method.get("band")
    if band is not None:
        if len(band) != 2 or not all(isinstance(b, (int, float)) for b in band) or not -1 <= band[0] < band[1] <= 1:
            raise ConfigError(f"method.band={list(band)!r} is invalid: it must be [low, high] with -1 <= low < high <= 1")
    # The NCU blocks (ncu.yaml): checked where a method has them.
    unlearn = method.get("unlearn") or {}
    for key, names in (("flagged_captions", FLAGGED_CAPTIONS), ("hn_capacity", HN_CAPACITIES)):
        if key in unlearn:
            _choice(unlearn[key], f"method.unlearn.{key}", names)
    for key in ("w_band", "w_flagged"):
        if unlearn.get(key) is not None:
            _number(unlearn[key], f"method.unlearn.{key}", low=0)
    for key, value in (method.get("stage1") or {}).items():
        if key.startswith("w_"):
            _number(value, f"method.stage1.{key}", low=0)
    negation = method.negation
    mode = negation.mode
    _choice(mode, "method.negation.mode", NEGATION_MODES)
    for key, names in (("head", NEGATION_HEADS), ("anchor", ANCHORS)):
        if key in negation:
            _choice(negation[key], f"method.negation.{key}", names)
    if negation.get("n_ctx") is not None:
        _number(negation.n_ctx, "method.negation.n_ctx", low=1, integer=True)
    for key in ("anchor_cos", "head_cos"):
        if negation.get(key) is not None:
            _number(negation[key], f"method.negation.{key}", low=-1, high=1, low_open=True, high_open=True)
    if mode != "none" and negation.perturb.enabled:
        from ncu.text_aug import CaptionPerturber, WordNetUnavailableError

        perturb = negation.perturb
        try:
            CaptionPerturber(ops=list(perturb.ops), alpha=perturb.alpha, require_wordnet=perturb.require_wordnet)
        except (WordNetUnavailableError, ValueError) as e:
            raise ConfigError(f"method.negation.perturb: {e}") from None


def _validate_solver(cfg: DictConfig) -> None:
    solver = cfg.get("solver")
    if not solver:
        return
    if solver.get("reg") is not None:
        _number(solver.reg, "solver.reg", low=0, low_open=True)
    if solver.get("max_iter") is not None:
        _number(solver.max_iter, "solver.max_iter", low=1, integer=True)
    if solver.get("tol") is not None:
        _number(solver.tol, "solver.tol", low=0, low_open=True)
    _choice(solver.get("stop", SINKHORN_STOPS[0]), "solver.stop", SINKHORN_STOPS)
    if solver.get("max_size") is not None:
        _number(solver.max_size, "solver.max_size", low=2, integer=True)


def _validate_stage(name: str, stage: dict) -> None:
    where = f"stage {name!r}"
    _choice(stage["objective"], f"{where}: objective", tuple(objectives.REGISTRY))
    if not isinstance(stage["epochs"], int) or isinstance(stage["epochs"], bool) or stage["epochs"] < 1:
        raise ConfigError(f"{where}: epochs={stage['epochs']!r} must be a positive integer")
    _number(stage["lr"], f"{where}: lr", low=0, low_open=True)
    _number(stage["weight_decay"], f"{where}: weight_decay", low=0)
    warmup = stage["warmup"]
    _number(warmup, f"{where}: warmup", low=0)
    if warmup >= 1 and not float(warmup).is_integer():
        raise ConfigError(f"{where}: warmup={warmup!r} must be a fraction (< 1) of the steps or a step count")
    _number(stage["min_lr_ratio"], f"{where}: min_lr_ratio", low=0, high=1)
    _number(stage["freeze_text_blocks"], f"{where}: freeze_text_blocks", low=0)
    if stage["detector"] is not None:
        _choice(stage["detector"], f"{where}: detector", DETECTORS)
    flag_after = stage["flag_after"]
    _number(flag_after, f"{where}: flag_after", low=0, integer=True)
    if flag_after >= stage["epochs"] and stage["objective"] in objectives.flag_objectives():
        raise ConfigError(f"{where}: flag_after={flag_after} warm-up epochs leave none of its {stage['epochs']} "
                          "epochs to act on the flags")
    for key, names in (("cut", DETECTION_CUTS), ("source", DETECTION_SOURCES)):  # a stage's own, over the method's
        if key in stage["detection"]:
            _choice(stage["detection"][key], f"{where}: detection.{key}", names)
    for gname, group in (stage.get("groups") or {}).items():
        if not isinstance(group, dict) or not group.get("params"):
            raise ConfigError(f"{where}: groups.{gname} needs params (a list of name patterns)")
        if group.get("lr") is not None:
            _number(group["lr"], f"{where}: groups.{gname}.lr", low=0, low_open=True)
        if group.get("weight_decay") is not None:
            _number(group["weight_decay"], f"{where}: groups.{gname}.weight_decay", low=0)


def validate_eval(cfg: DictConfig) -> None:
    """evaluate.py's checks that need neither model nor data."""
    check_added_keys(cfg)
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ConfigError("ckpt_path is not set: pass ckpt_path=<run_dir>/checkpoints/last.ckpt, or "
                          "ckpt_path=pretrained model=<name> model.pretrained=<tag or file>")
    if cfg.ckpt_path != "pretrained" and not Path(str(cfg.ckpt_path)).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r}: file not found")
    if cfg.ckpt_path == "pretrained":
        _validate_model(cfg)


def run_dir_of(ckpt_path: str | None, default: str = "logs/eval") -> str:
    """The training run dir of ``<run_dir>/checkpoints/<name>.ckpt`` (``default`` for other inputs)."""
    if not ckpt_path or ckpt_path == "pretrained":
        return default
    path = Path(ckpt_path).resolve()
    return str(path.parent.parent if path.parent.name == "checkpoints" else path.parent)


_CLAIMED_GPU: str | None = None


def gpu_for_job(n_gpus: int | str = 1) -> str:
    """CUDA_VISIBLE_DEVICES of a local sweep worker: one GPU per worker process, kept for its lifetime.

    Joblib workers run several jobs each and CUDA reads CUDA_VISIBLE_DEVICES once per process, so the GPU
    belongs to the worker, not to the job number. Workers of one sweep (same parent) take the lowest free
    index with a lock the OS releases when the worker exits. With CUDA_VISIBLE_DEVICES set for the sweep,
    index i is its i-th entry."""
    global _CLAIMED_GPU
    if _CLAIMED_GPU is None:
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        n = int(n_gpus)
        folder = Path(tempfile.gettempdir()) / f"ncu-gpus-{os.getuid()}-{os.getppid()}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            fd = os.open(folder / f"{i}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _CLAIMED_GPU = visible[i] if i < len(visible) else str(i)  # fd stays open: the claim lasts
            break
        else:
            raise RuntimeError(f"ncu_gpu_for_job: the {n} GPUs are all held by other workers of this sweep; "
                               "set hydra.launcher.n_jobs <= NCU_N_GPUS")
    return _CLAIMED_GPU


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ncu_run_dir"):
        OmegaConf.register_new_resolver("ncu_run_dir", run_dir_of)
    if not OmegaConf.has_resolver("ncu_gpu_for_job"):
        OmegaConf.register_new_resolver("ncu_gpu_for_job", gpu_for_job)


register_resolvers()
