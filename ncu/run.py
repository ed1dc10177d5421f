"""train(cfg) and evaluate(cfg): build the objects from a config, run, return (metrics, objects)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ncu.config import ConfigError, plan_stages, validate
from ncu.data.datamodule import PairDataModule
from ncu.lit_module import CLIPUnlearner
from ncu.models import factory

log = logging.getLogger(__name__)
HEADLINE = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum", "zeroshot_top1")


def build(cfg: DictConfig) -> tuple[factory.ModelBundle, PairDataModule, CLIPUnlearner]:
    """Model (with its transforms and tokenizer), data module and Lightning module of a run config."""
    bundle = factory.create(cfg.model.name, cfg.model.pretrained,
                            aug_cfg=OmegaConf.to_container(cfg.model.get("aug") or {}, resolve=True))
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
    module.classnames = dm.classnames
    module.eval_labels = {split: dm.category_labels(split) for split in ("val", "test")}
    return bundle, dm, module


def build_loggers(cfg: DictConfig) -> list[Any]:
    loggers = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is None or "_target_" not in lcfg:
            continue
        if name == "wandb":
            loggers.append(instantiate(lcfg, config=OmegaConf.to_container(cfg, resolve=True)))
        else:
            loggers.append(instantiate(lcfg))
    return loggers


def build_trainer(cfg: DictConfig, stage: dict, loggers: list[Any], run_dir: Path, index: int, name: str,
                  step_offset: int) -> L.Trainer:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar

    callbacks: list[Any] = [ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0,
                                                  enable_version_counter=False)]
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar())
    trainer = instantiate(cfg.trainer, max_epochs=stage["epochs"], logger=loggers or False, callbacks=callbacks)
    # Stages are separate fits; continue the logged step so dashboards show one x-axis for the run.
    trainer.fit_loop.epoch_loop._batches_that_stepped = step_offset
    return trainer


def test_metrics(trainer: L.Trainer, module: CLIPUnlearner, dm: PairDataModule, prefix: str) -> dict[str, float]:
    module.test_prefix = prefix
    trainer.test(module, datamodule=dm, verbose=False)
    return dict(module.last_eval)


def print_table(metrics: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="test split: before (pre-trained) vs after (method)")
    for col in ("metric", "before", "after", "change"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for key in HEADLINE:
        before, after = metrics.get(f"pretrain/{key}"), metrics.get(f"test/{key}")
        if before is None or after is None:
            continue
        table.add_row(key, f"{before:.2f}", f"{after:.2f}", f"{after - before:+.2f}")
    Console().print(table)


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    validate(cfg)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    bundle, dm, module = build(cfg)
    art = dm.noise_artifact
    metrics: dict[str, float] = {
        "noise/realised_rate": art.realised_rate, "noise/num_noisy": float(art.noisy_mask.sum()),
        "data/train_pairs": float(len(dm.datasets["train"])), "data/skipped": float(dm.skipped),
    }
    # The run records which corruption it trained on (the artifact itself stays shared in paths.noise_dir).
    write_json(run_dir / "noise_meta.json", {**art.meta, "artifact_dir": str(dm.noise_folder)})
    loggers = build_loggers(cfg)
    for lg in loggers:
        lg.log_hyperparams({"noise_artifact": str(dm.noise_folder), **{k: v for k, v in metrics.items()}})
    plan = plan_stages(cfg)
    trainer, step = None, 0
    try:
        for index, (name, stage) in enumerate(plan):
            # Re-seed per stage: a stage's randomness does not depend on whether earlier ones ran or were loaded.
            L.seed_everything(cfg.seed + index, workers=True)
            module.set_stage(name, stage)
            trainer = build_trainer(cfg, stage, loggers, run_dir, index, name, step)
            if index == 0 and name != "pretrain":
                metrics.update(test_metrics(trainer, module, dm, "pretrain"))  # the model as given
            ckpt = run_dir / "checkpoints" / f"stage{index}_{name}.ckpt"
            cache = pretrain_cache_path(cfg, stage) if name == "pretrain" else None
            if cache is not None and cache.exists():
                log.info("stage %d/%d: %s loaded from the pre-training cache %s", index + 1, len(plan), name, cache)
                factory.load_run_checkpoint(module.model, str(cache))
                copy_atomic(cache, ckpt)
            else:
                log.info("stage %d/%d: %s (%s, %d epochs)", index + 1, len(plan), name, stage["objective"],
                         stage["epochs"])
                trainer.fit(module, datamodule=dm)
                step = trainer.fit_loop.epoch_loop._batches_that_stepped
                trainer.save_checkpoint(ckpt)
                if cache is not None:
                    copy_atomic(ckpt, cache)
            if name == "pretrain":
                metrics.update(test_metrics(trainer, module, dm, "pretrain"))
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()
                        if k.startswith("train/") and v.numel() == 1})
        metrics.update(test_metrics(trainer, module, dm, "test"))
        for lg in loggers:
            lg.log_metrics({k: v for k, v in metrics.items() if k.startswith(("pretrain/", "test/"))}, step)
        write_json(run_dir / "metrics.json", metrics)
        if cfg.get("print_table", True):
            print_table(metrics)
    finally:
        finish_wandb()
    return metrics, {"module": module, "datamodule": dm, "trainer": trainer, "run_dir": run_dir}


def pretrain_cache_path(cfg: DictConfig, stage: dict) -> Path | None:
    """Where the pre-trained checkpoint of this (model, data, noise, pre-training recipe, seed) is kept.

    Sweeps over methods share it instead of pre-training again; any change to what pre-training
    depends on gives another key."""
    if not cfg.pretrain.get("cache", True):
        return None
    spec = {
        "model": cfg.model, "data": cfg.data, "noise": cfg.noise, "stage": stage, "seed": cfg.seed,
        "optim": {k: v for k, v in cfg.optim.items() if k != "stage_defaults"},
        "trainer": {k: cfg.trainer.get(k) for k in ("precision", "limit_train_batches", "accumulate_grad_batches",
                                                  "gradient_clip_val")},
    }
    spec = OmegaConf.to_container(OmegaConf.create(spec), resolve=True)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    n = cfg.noise
    name = f"{cfg.model.name}_{cfg.data.name}_{n.protocol}{n.rate:g}-ns{n.seed}_seed{cfg.seed}_{key}.ckpt"
    return Path(cfg.paths.pretrain_dir) / name


def copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def finish_wandb() -> None:
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    if wandb.run is not None:
        wandb.finish()

