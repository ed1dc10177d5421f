"""Config checks that fail at start with one clear message, before any data or model is built."""
from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ncu.data.noise import PROTOCOLS

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key and the problem."""


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


def plan_stages(cfg: DictConfig) -> list[tuple[str, dict]]:
    """The run's ordered stages ``[(name, settings)]``: pre-training (when enabled) then the method's."""
    defaults = OmegaConf.to_container(cfg.optim.stage_defaults, resolve=True)
    plan = []
    enabled = cfg.pretrain.enabled
    if enabled is True or (enabled == "auto" and cfg.model.pretrained is None):
        plan.append(("pretrain", {**defaults, **OmegaConf.to_container(cfg.pretrain.stage, resolve=True)}))
    for name, stage in (cfg.method.get("stages") or {}).items():
        if stage is not None:  # method.stages.<name>=null drops a stage
            plan.append((name, {**defaults, **OmegaConf.to_container(stage, resolve=True)}))
    cap = cfg.get("epochs_cap")
    for _, stage in plan:
        if cap is not None:
            stage["epochs"] = min(stage["epochs"], cap)
    return plan


def _local_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def validate(cfg: DictConfig) -> None:
    from ncu.lit_module import ANCHORS, DETECTORS, NEGATION_HEADS, OBJECTIVES
    from ncu.objectives.ncu import FLAGGED_CAPTIONS, HN_CAPACITIES
    from ncu.models.factory import check_model_name

    rate = cfg.noise.rate
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate < 1:
        raise ConfigError(f"noise.rate={rate!r} is invalid: it must be a number in [0, 1)")
    if cfg.noise.protocol not in PROTOCOLS:
        raise ConfigError(f"noise.protocol={cfg.noise.protocol!r} is unknown; choose from {', '.join(PROTOCOLS)}")
    try:
        check_model_name(cfg.model.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    pretrained = cfg.model.pretrained
    if pretrained is not None and ("/" in str(pretrained) or Path(str(pretrained)).suffix):
        if not Path(str(pretrained)).exists():
            raise ConfigError(f"model.pretrained={pretrained!r}: file not found")
    if cfg.data.get("source") == "csv":
        path = OmegaConf.select(cfg, "data.path", throw_on_missing=False)
        if not path or not Path(path).is_file():
            raise ConfigError(f"data.path={path!r}: file not found (data=csv needs a CSV/TSV of pairs)")
        # Only the header row: a wrong column name fails here, before any image is read.
        import pandas as pd

        from ncu.data.sources import require_columns

        roles = {f"data.{r}": cfg.data.get(r) for r in ("image_key", "caption_key", "category_key", "key_key")}
        try:
            require_columns(path, cfg.data.get("sep"), roles, sep_hint="set data.sep")
        except pd.errors.EmptyDataError:
            raise ConfigError(f"data.path={path!r}: the file is empty (a header row is needed)") from None
        except ValueError as e:
            raise ConfigError(str(e)) from None  # names the file, the column, its data.* key and those found
    elif cfg.data.get("source") == "wds":
        from ncu.data.wds import expand_shards

        spec = OmegaConf.select(cfg, "data.shards", throw_on_missing=False)
        shards = expand_shards(spec) if spec else []
        missing = [s for s in shards if not Path(s).is_file()]
        if not shards or missing:
            raise ConfigError(f"data.shards={spec!r}: {len(missing)} of {len(shards)} shards not found "
                              f"(e.g. {missing[:3]}); data=wds needs tar shards, "
                              "e.g. 'data.shards=\"/data/cc3m/{00000..00331}.tar\"'")
    if cfg.data.batch_size < 2:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is invalid: contrastive training needs >= 2")
    ratio = cfg.method.get("nc_ratio", 0.0)
    if not 0 <= ratio < 1:
        raise ConfigError(f"method.nc_ratio={ratio!r} is invalid: it must be in [0, 1)")
    detector = cfg.method.get("detector", "batch")
    if detector not in DETECTORS:
        raise ConfigError(f"method.detector={detector!r} is unknown; choose from {', '.join(DETECTORS)}")
    unlearn = cfg.method.get("unlearn") or {}
    for key, choices in (("flagged_captions", FLAGGED_CAPTIONS), ("hn_capacity", HN_CAPACITIES)):
        if unlearn.get(key, choices[0]) not in choices:
            raise ConfigError(f"method.unlearn.{key}={unlearn.get(key)!r} is unknown; choose from {', '.join(choices)}")
    gamma = cfg.method.get("gamma")
    if gamma is not None and not 0 <= gamma <= 1:
        raise ConfigError(f"method.gamma={gamma!r} is invalid: it must be in [0, 1]")
    negation = cfg.method.get("negation") or {}
    if negation.get("mode", "none") not in ("none", "prompt", "template"):
        raise ConfigError(f"method.negation.mode={negation.get('mode')!r} is unknown; choose none, prompt or template")
    for key, choices in (("head", NEGATION_HEADS), ("anchor", ANCHORS)):
        if negation.get(key, "none") not in choices:
            raise ConfigError(f"method.negation.{key}={negation.get(key)!r} is unknown; choose from {', '.join(choices)}")
    perturb = negation.get("perturb") or {}
    if negation.get("mode", "none") != "none" and perturb.get("enabled", True):
        from ncu.text_aug import CaptionPerturber, WordNetUnavailableError

        try:
            CaptionPerturber(ops=list(perturb.get("ops", [])), alpha=perturb.get("alpha", 0.1),
                             require_wordnet=perturb.get("require_wordnet", True))
        except (WordNetUnavailableError, ValueError) as e:
            raise ConfigError(f"method.negation.perturb: {e}") from None
    if _local_multirun() and "ddp" in str(cfg.trainer.get("strategy")) and "SLURM_NTASKS" not in os.environ:
        raise ConfigError("trainer=ddp inside a local multirun: use hydra/launcher=slurm, or run the points one by one")
    plan = plan_stages(cfg)
    if not plan:
        raise ConfigError("the run has no stage: method.stages is empty and pre-training is off")
    for name, stage in plan:
        if stage["objective"] not in OBJECTIVES:
            raise ConfigError(f"stage {name!r}: objective {stage['objective']!r} is unknown; choose from {OBJECTIVES}")
        if not isinstance(stage["epochs"], int) or stage["epochs"] < 1:
            raise ConfigError(f"stage {name!r}: epochs={stage['epochs']!r} must be a positive integer")
        if stage["lr"] <= 0:
            raise ConfigError(f"stage {name!r}: lr={stage['lr']!r} must be positive")


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
