"""The run's loggers: built once from ``cfg.logger`` and shared by every stage's Trainer, on one x-axis."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf


def on_run_steps(logger: Logger) -> Logger:
    """``logger`` on the run's x-axis. The stages are separate fits whose trainers count steps from 0; the
    logger adds the steps of the stages before (``logger.stage_start``, see :func:`set_stage_start`), so a
    dashboard shows one x-axis for the run (wandb drops a step lower than one it has seen). Only this instance's
    ``log_metrics`` changes (``log_image`` and the trainer's calls go through it); the class stays the same."""
    log_metrics = logger.log_metrics  # the class's, bound

    def on_run_step(metrics: dict[str, float], step: int | None = None) -> None:
        log_metrics(metrics, None if step is None else step + logger.stage_start)

    logger.stage_start = 0
    logger.log_metrics = on_run_step
    return logger


def set_stage_start(loggers: list[Any], step: int) -> None:
    for lg in loggers:
        lg.stage_start = step


def build_loggers(cfg: DictConfig) -> list[Any]:
    loggers = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is None or "_target_" not in lcfg:
            continue
        if name == "wandb":
            logger = instantiate(lcfg, id=wandb_run_id(Path(cfg.paths.output_dir)), resume="allow")
            full = OmegaConf.to_container(cfg, resolve=True)
            if HydraConfig.initialized():
                full["hydra_choices"] = dict(HydraConfig.get().runtime.choices)
                full["overrides"] = list(HydraConfig.get().overrides.task)
            logger.log_hyperparams(full)  # the full resolved config, not only the module's
        else:
            logger = instantiate(lcfg)
        loggers.append(on_run_steps(logger))
    return loggers


def wandb_run_id(run_dir: Path) -> str:
    """One wandb run per run dir: the id is stored there so ``resume=auto`` continues the same run."""
    path = run_dir / "wandb_id.txt"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(uuid.uuid4().hex[:8] + "\n")
    try:
        os.link(tmp, path)  # the first rank to get here decides the id
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()


def finish_wandb() -> None:
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    if wandb.run is not None:
        wandb.finish()
