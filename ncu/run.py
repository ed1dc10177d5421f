"""train(cfg) and evaluate(cfg): build the objects from a config, run, return (metrics, objects)."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from ncu import resume
from ncu.callbacks import DashboardImages
from ncu.config import ConfigError, plan_stages, validate
from ncu.errors import CheckpointError, DivergedError, StorageError
from ncu.data.datamodule import PairDataModule
from ncu.data.stats import DataStatsCallback
from ncu.eval.during_training import TrainingTasks, training_tasks
from ncu.files import atomic_path, storage_error
from ncu.lit_module import CLIPUnlearner
from ncu.loggers import build_loggers, finish_wandb, set_stage_start
from ncu.stages import lr_key, non_finite_parameters, pretrain_cache_path, pretrain_spec
from ncu.models import factory

log = logging.getLogger(__name__)
HEADLINE = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum", "zeroshot_top1")
SHIFT_HEADLINE = ("rsum", "zeroshot_top1")  # per shifted style (data.shifts), in the before/after table


def build(cfg: DictConfig) -> tuple[factory.ModelBundle, PairDataModule, CLIPUnlearner]:
    """Model (with its transforms and tokenizer), data module and Lightning module of a run config."""
    bundle = factory.create(cfg.model.name, cfg.model.pretrained,
                            aug_cfg=OmegaConf.to_container(cfg.model.get("aug") or {}, resolve=True),
                            trusted=cfg.trust_checkpoints, logit_scale=cfg.model.get("logit_scale"))
    factory.speed_switches(bundle.model, cfg.model.grad_checkpointing, cfg.model.compile)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    dm = PairDataModule(data, OmegaConf.to_container(cfg.noise, resolve=True), batch_size=data["batch_size"],
                        eval_batch_size=data["eval_batch_size"], num_workers=data["num_workers"],
                        noise_dir=cfg.paths.noise_dir)
    dm.attach(bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer)
    dm.setup()
    method = OmegaConf.to_container(cfg.method, resolve=True)
    method["solver"] = OmegaConf.to_container(cfg.solver, resolve=True) if cfg.get("solver") else None
    module = CLIPUnlearner(bundle.model, bundle.tokenizer, method,
                           OmegaConf.to_container(cfg.optim, resolve=True),
                           config=OmegaConf.to_container(cfg, resolve=True))
    module.attach_data(dm)
    return bundle, dm, module


def build_trainer(cfg: DictConfig, stage: dict, loggers: list[Any], run_dir: Path, index: int, name: str,
                  step_offset: int, extra: tuple[L.Callback, ...] = ()) -> L.Trainer:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar

    # last.ckpt after every epoch (and every checkpoint.every_n_steps steps), for resume=auto inside a stage.
    # (save_last with save_top_k=0 writes it only when the fit ends: Lightning saves `last` only at steps where
    # a top-k checkpoint was saved.)
    folder, keep = run_dir / "checkpoints", cfg.checkpoint
    callbacks: list[Any] = [ModelCheckpoint(dirpath=folder, filename="last", save_top_k=1,
                                            enable_version_counter=False)]
    if keep.every_n_steps:
        callbacks.append(ModelCheckpoint(dirpath=folder, filename="last", save_top_k=1, enable_version_counter=False,
                                         every_n_train_steps=int(keep.every_n_steps)))
    if keep.best:
        callbacks.append(ModelCheckpoint(dirpath=folder, filename=f"stage{index}_{name}_best", monitor=keep.monitor,
                                         mode="max", save_top_k=1, save_weights_only=True,
                                         enable_version_counter=False, auto_insert_metric_name=False))
    callbacks.append(DataStatsCallback())
    callbacks += list(extra)
    if loggers:
        callbacks += [LearningRateMonitor(logging_interval="step"), DashboardImages()]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar())
    trainer = instantiate(cfg.trainer, max_epochs=stage["epochs"], logger=loggers or False, callbacks=callbacks,
                          plugins=[AtomicCheckpointIO()])
    set_stage_start(loggers, step_offset)  # the stage's steps continue the run's on the dashboards
    return trainer


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file and rename: a kill during a save never corrupts ``last.ckpt``."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        # torch.save streams into the file beside the target. Lightning's own save first serialises the whole
        # checkpoint in memory, then stages it in TMPDIR and moves it (a copy when TMPDIR is another disk).
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def test_metrics(trainer: L.Trainer, module: CLIPUnlearner, dm: PairDataModule, prefix: str) -> dict[str, float]:
    """The test pass's metrics, logged (and returned by ``trainer.test``) under ``prefix``."""
    module.test_prefix = prefix
    return eval_results(trainer.test(module, datamodule=dm, verbose=False), prefix)


def eval_results(results: list[dict[str, float]], prefix: str) -> dict[str, float]:
    """What ``trainer.test`` / ``trainer.validate`` returned (one dict per dataloader), the keys under ``prefix``."""
    return {k: float(v) for k, v in results[0].items() if k.startswith(f"{prefix}/")}


def entry_metrics(cfg: DictConfig, trainer: L.Trainer, module: CLIPUnlearner,
                  dm: PairDataModule) -> dict[str, float]:
    """The model entering fine-tuning: test metrics, val rSum (``pretrain/val_rsum``, what stage-end
    numbers are compared with) and its NC detection over the whole training split (``pretrain/nc_*``)."""
    out = test_metrics(trainer, module, dm, "pretrain")
    val = eval_results(trainer.validate(module, datamodule=dm, verbose=False), "val")
    out.update({f"pretrain/val_{k.split('/', 1)[1]}": v for k, v in val.items() if k.endswith(("rsum", "zeroshot_top1"))})
    loader = dm.scoring_loader(cfg.seed) if cfg.pretrain.get("detection", True) else None
    if loader is not None:
        out.update({f"pretrain/nc_{k}": v for k, v in module.detection_pass(loader).items()})
    return out


def stage_end_metrics(name: str, module: CLIPUnlearner, dm: PairDataModule,
                      fit_metrics: dict[str, float]) -> dict[str, float]:
    """``<stage>/val_rsum`` (val at the stage's end) and, with a negated path, ``<stage>/cos_t_tn``: mean
    cos(t, t~) over the val captions (unperturbed)."""
    out = {f"{name}/val_rsum": fit_metrics["val/rsum"]} if "val/rsum" in fit_metrics else {}
    if module.negation_mode != "none":
        out[f"{name}/cos_t_tn"] = module.mean_cos_t_tn(dm.datasets["val"].frame["caption"].tolist())
    return out


def print_table(metrics: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="test split: before (pre-trained) vs after (method)")
    for col in ("metric", "before", "after", "change"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    styles = sorted({k.split("/")[1] for k in metrics if k.startswith("test/") and k.count("/") == 2})
    keys = [*HEADLINE, *(f"{style}/{m}" for style in styles for m in SHIFT_HEADLINE)]
    for key in keys:
        before, after = metrics.get(f"pretrain/{key}"), metrics.get(f"test/{key}")
        if before is None or after is None:
            continue
        table.add_row(key, f"{before:.2f}", f"{after:.2f}", f"{after - before:+.2f}")
    Console().print(table)


def write_json(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


def single_log_stream() -> None:
    """Lightning adds console handlers (``lightning`` and its subpackages); with Hydra's root handler every
    line would print twice. Its product tips ("💡 Tip: ... litlogger"), one per stage, are dropped, and so is
    its warning about a non-empty checkpoint folder: the stages share one by design."""
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # torch deprecates the LeafSpec() that this Lightning release still builds (nothing for a user to do)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        if logging.getLogger().handlers:
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_a_tip not in rank_zero.filters:
        rank_zero.addFilter(_not_a_tip)


@dataclass
class Run:
    """What the stages of one run share: its config and folder, data, module, loggers, the stage plan, the
    metrics so far and the progress a resume continues from."""

    cfg: DictConfig
    run_dir: Path
    dm: PairDataModule
    module: CLIPUnlearner
    loggers: list[Any]
    plan: list[tuple[str, dict]]
    progress: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    trainer: L.Trainer | None = None
    callbacks: tuple[L.Callback, ...] = ()  # every stage's besides the checkpoints (the tasks of train_eval)

    @property
    def step(self) -> int:
        return self.progress["step"]

    def checkpoint(self, index: int) -> Path:
        return self.run_dir / "checkpoints" / f"stage{index}_{self.plan[index][0]}.ckpt"

    def stage_done(self, name: str) -> None:
        self.progress["completed"].append(name)
        write_json(self.run_dir / "progress.json", {**self.progress, "metrics": self.metrics})


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Build the run, skip what a resumed attempt finished, run each stage, then test and write the metrics
    (the README's "What a run does")."""
    single_log_stream()
    validate(cfg)
    tasks = training_tasks(cfg)  # their paths and tables checked before anything is built
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = resume.start(cfg, run_dir)  # refuses a resume into a folder made by another config
    L.seed_everything(cfg.seed, workers=True)
    _, dm, module = build(cfg)
    resume.record(cfg, run_dir)
    run = Run(cfg, run_dir, dm, module, build_loggers(cfg), plan_stages(cfg),
              {"step": 0, "fit_metrics": {}, **progress})
    run.metrics = {**record_data(run), **progress["metrics"]}
    if tasks:
        run.callbacks = (TrainingTasks(tasks, cfg.train_eval.every_n_epochs, dm.preprocess_val,
                                       run_dir / "train_eval", cfg),)
    try:
        n_done = finished_stages(run)
        for index, (name, stage) in enumerate(run.plan):
            if index < n_done:
                continue
            if index and index == n_done:  # resuming after a finished stage: start from its weights
                load_stage_weights(run, index - 1)
            run_stage(run, index, name, stage)
        finish(run)
    except SIGTERMException:
        # Lightning stops the fit on SIGTERM with a SystemExit of status 0; a scheduler (SLURM's requeue)
        # must see an interrupted run. The epoch checkpoints and progress.json stay for resume=auto.
        log.error("stopped by SIGTERM during stage %r: resume=auto continues from its last epoch checkpoint",
                  run.module.stage_name)
        raise SystemExit(143) from None
    finally:
        finish_wandb()
    return run.metrics, {"module": module, "datamodule": dm, "trainer": run.trainer, "run_dir": run_dir}


def record_data(run: Run) -> dict[str, float]:
    """The corruption and split the run trains on: noise_meta.json in the run folder (the artifact itself
    stays shared in paths.noise_dir), its figures as the first metrics, and both given to the loggers."""
    dm, art = run.dm, run.dm.noise_artifact
    metrics = {"noise/realised_rate": art.realised_rate, "noise/num_noisy": float(art.noisy_mask.sum()),
               "data/train_pairs": float(len(dm.datasets["train"])), "data/skipped": float(dm.skipped)}
    for style, sets in dm.shifts.items():  # what each shifted style draws of the test data
        metrics.update({f"shift/{style}/concepts_drawn": float(sets["concepts_drawn"]),
                        f"shift/{style}/test_pairs": float(len(sets["test"])),
                        f"shift/{style}/zeroshot_images": float(len(sets["zeroshot"]))})
    write_json(run.run_dir / "noise_meta.json", {**art.meta, "artifact_dir": str(dm.noise_folder)})
    for lg in run.loggers:
        lg.log_hyperparams({"noise_artifact": str(dm.noise_folder), **metrics})
    return metrics


def finished_stages(run: Run) -> int:
    """How many stages a previous attempt finished (resume=auto); they must be this plan's first stages."""
    for index, done in enumerate(run.progress["completed"]):
        if index >= len(run.plan) or run.plan[index][0] != done:
            planned = run.plan[index][0] if index < len(run.plan) else None
            raise ConfigError(f"resume=auto: {run.run_dir} ran stage {done!r} where this config has {planned!r}")
    return len(run.progress["completed"])


def run_stage(run: Run, index: int, name: str, stage: dict) -> None:
    """One stage: seeded from the run seed and its name, loaded from the pre-training cache or fitted, its
    checkpoint written, the entry metrics taken where fine-tuning starts, the progress saved."""
    cfg, module, dm = run.cfg, run.module, run.dm
    L.seed_everything(stage_seed(cfg.seed, name), workers=True)
    module.set_stage(name, stage)
    module.stage_index = index
    run.trainer = build_trainer(cfg, stage, run.loggers, run.run_dir, index, name, run.step, run.callbacks)
    if index == 0 and name != "pretrain":
        run.metrics.update(entry_metrics(cfg, run.trainer, module, dm))  # the model as given
    cache = pretrain_cache_path(cfg, stage, dm.dataset_key) if name == "pretrain" else None
    cached = cache is not None and load_cached_pretrain(module, cache, cfg.trust_checkpoints)
    if cached:
        log.info("stage %d/%d: %s loaded from the pre-training cache %s", index + 1, len(run.plan), name, cache)
        copy_atomic(cache, run.checkpoint(index))
    else:
        fit_stage(run, index, name, stage)
        if cache is not None:
            try:
                copy_atomic(run.checkpoint(index), cache)
            except (OSError, StorageError) as e:  # the cache only saves later runs a pre-training
                log.warning("pre-training cache not written, the run goes on: %s", storage_error(e, cache) or e)
    # Compute: a cached pre-training reports what it cost when it ran (cost/pretrain_cached = 1).
    run.metrics.update({f"cost/{name}_samples": float(module.cost["samples"]),
                        f"cost/{name}_seconds": float(module.cost["seconds"])})
    if name == "pretrain":
        run.metrics["cost/pretrain_cached"] = float(cached)
        run.metrics.update(entry_metrics(cfg, run.trainer, module, dm))
    run.stage_done(name)


def fit_stage(run: Run, index: int, name: str, stage: dict) -> None:
    """``trainer.fit`` of the stage (from its last epoch checkpoint when resuming inside it), then the last
    epoch's train/* and val/*, the stage-end metrics and the stage checkpoint."""
    trainer = run.trainer
    trusted = run.cfg.trust_checkpoints
    resume_from = mid_stage_checkpoint(run, index) if run.cfg.get("resume") == "auto" else None
    log.info("stage %d/%d: %s (%s, %d epochs)%s", index + 1, len(run.plan), name, stage["objective"],
             stage["epochs"], f", resumed from {resume_from}" if resume_from else "")
    trainer.fit(run.module, datamodule=run.dm, ckpt_path=resume_from, weights_only=not trusted)
    run.progress["step"] += trainer.global_step  # optimizer steps: the stage's trainer counts from 0
    # Read now: a test run would reset them.
    run.progress["fit_metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()
                                   if k.startswith(("train/", "val/")) and v.numel() == 1}
    refuse_diverged(run.module, name)
    if name != "pretrain":
        run.metrics.update(stage_end_metrics(name, run.module, run.dm, run.progress["fit_metrics"]))
    trainer.save_checkpoint(run.checkpoint(index), weights_only=False)  # the full state: a resume continues it


def refuse_diverged(module: CLIPUnlearner, stage: str) -> None:
    """A stage whose last update made weights non-finite (after a finite loss) is not a stage result."""
    bad = non_finite_parameters(module)
    if bad:
        raise DivergedError(f"stage {stage!r} ended with non-finite weights ({len(bad)} tensors, e.g. {bad[:2]}); "
                            f"lower {lr_key(stage)}: the model is not checkpointed, cached or evaluated")


def finish(run: Run) -> None:
    """Test the final model (the last stage's weights when every stage was already done), log the run's
    numbers and write metrics.json."""
    if run.trainer is None:
        last = len(run.plan) - 1
        load_stage_weights(run, last)
        run.trainer = build_trainer(run.cfg, run.plan[last][1], [], run.run_dir, last, run.plan[last][0], run.step)
    metrics = run.metrics
    metrics.update(run.progress["fit_metrics"])
    metrics.update({f"data/{k}": float(v) for k, v in run.dm.stats().items() if isinstance(v, (int, float))})
    metrics.update(test_metrics(run.trainer, run.module, run.dm, "test"))
    stages = [name for name, _ in run.plan if f"cost/{name}_samples" in metrics]
    metrics["cost/total_samples"] = float(sum(metrics[f"cost/{n}_samples"] for n in stages))
    metrics["cost/total_seconds"] = float(sum(metrics[f"cost/{n}_seconds"] for n in stages))
    set_stage_start(run.loggers, run.step)
    for lg in run.loggers:
        lg.log_metrics({k: v for k, v in metrics.items() if k.startswith(("pretrain/", "test/", "cost/"))}, 0)
    write_json(run.run_dir / "metrics.json", metrics)
    if run.cfg.get("print_table", True):
        print_table(metrics)


def stage_seed(seed: int, stage: str) -> int:
    """Each stage re-seeds from the run seed and its name, so its randomness does not depend on whether
    earlier stages ran here, came from the pre-training cache or from ``model.pretrained``."""
    return seed + int(hashlib.sha1(stage.encode()).hexdigest()[:6], 16) % 100_000


def load_stage_weights(run: Run, index: int) -> None:
    """Weights of a finished stage of this run. A pre-training checkpoint may come from a run of another method
    (the shared cache), so it may lack this method's negation prompt: that alone is allowed to be missing."""
    path, module = run.checkpoint(index), run.module
    ckpt = factory.read_checkpoint(path, run.cfg.trust_checkpoints)
    check_checkpoint_config(run, index, ckpt, path)
    factory.check_state_dict(module, ckpt["state_dict"], path, module.hparams["config"].get("model", {}).get("name"),
                             factory.trained_model_name(ckpt), optional=("prompt.",))
    module.load_state_dict(ckpt["state_dict"], strict=False)
    module.memory.restore(ckpt, module.device)


def check_checkpoint_config(run: Run, index: int, ckpt: dict, path: Path) -> None:
    """A resume continues only from checkpoints written with this run's config (a folder another config also
    wrote into holds others): the whole config apart from ``resume.FREE_KEYS`` (paths may differ: a moved
    folder resumes); for a pre-training, which may come from the shared cache, its recipe (``pretrain_spec``)."""
    saved = (ckpt.get("hyper_parameters") or {}).get("config")
    if not isinstance(saved, dict) or not saved:
        log.warning("resume=auto: %s records no config (an older version): not compared with this run's", path)
        return
    name, stage = run.plan[index]
    if name == "pretrain":
        theirs = dict(plan_stages(OmegaConf.create(saved))).get("pretrain")
        changed = (resume.changed_keys(pretrain_spec(OmegaConf.create(saved), theirs), pretrain_spec(run.cfg, stage))
                   if theirs is not None else ["pretrain"])
    else:
        changed = resume.changed_keys(saved, resume.resolved(run.cfg))
    if changed:
        raise ConfigError(f"resume=auto: {path} was written with another config ({resume.shown(changed)}); "
                          "resume with that config or start a new run folder")


def load_cached_pretrain(module: CLIPUnlearner, cache: Path, trusted: bool = False) -> bool:
    """Load the cached pre-trained weights; a cache file that is missing or does not load (truncated, another
    model, objects that safe loading refuses) is reported in one line and pre-training runs again (its result
    replaces the file)."""
    if not cache.exists():
        return False
    try:
        ckpt = factory.load_run_checkpoint(module.model, str(cache),
                                           module.hparams["config"].get("model", {}).get("name"), trusted)
    except CheckpointError as e:
        log.warning("pre-training cache unusable, pre-training again: %s", e)
        return False
    if non_finite_parameters(module.model):
        log.warning("pre-training cache %s holds non-finite weights (a diverged pre-training), pre-training again",
                    cache)
        return False
    module.cost = dict(ckpt.get("ncu_cost") or {"samples": float("nan"), "seconds": float("nan")})  # older files: unknown
    if not module.memory.restore(ckpt, module.device) and module.detector == "ema":
        log.warning("pre-training cache %s holds no per-sample history (written by an older version): the ema "
                    "detector starts from a scoring pass; delete the file to pre-train again with it", cache)
    return True


def mid_stage_checkpoint(run: Run, index: int) -> str | None:
    """``last.ckpt`` when it was written during stage ``index`` (an interrupted stage) by this config, else
    None."""
    last = run.run_dir / "checkpoints" / "last.ckpt"
    if not last.exists():
        return None
    ckpt = factory.read_checkpoint(last, run.cfg.trust_checkpoints)
    if ckpt.get("ncu_stage_index") != index:
        return None
    check_checkpoint_config(run, index, ckpt, last)
    return str(last)


def copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
