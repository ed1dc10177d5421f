"""Downstream tasks scored during training (open_clip's ``--zeroshot-frequency``): the tasks of
``train_eval.tasks`` (any kind of ``conf/benchmark/`` that reads its own data: a zero-shot image folder, a
retrieval CSV, a linear probe) every ``train_eval.every_n_epochs`` epochs of every stage, logged as
``val/<task>/<metric>`` beside the run's own validation."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from ncu.errors import ConfigError

log = logging.getLogger(__name__)
# Tasks that score the run's own data need the rebuilt run (evaluate.py); during training that is val/*.
OWN_DATA_KINDS = ("zeroshot_folder", "retrieval_csv", "linear_probe_folder")
DATA_KEYS = {"zeroshot_folder": "data", "retrieval_csv": "csv", "linear_probe_folder": "test"}


def training_tasks(cfg: DictConfig) -> dict[str, dict]:
    """The tasks to score during training, checked as evaluate.py checks a suite (paths, tables, class names)
    before anything trains. A task whose data path is null is left out with one line: a preset can name a
    task (the paper's ImageNet) and leave its path to the user."""
    from ncu.eval.suite import suite_tasks

    tasks = OmegaConf.to_container(cfg.train_eval.tasks, resolve=False) or {}
    keep = {}
    for name, task in tasks.items():
        if task is None:
            continue
        kind = task.get("kind")
        if kind not in OWN_DATA_KINDS:
            raise ConfigError(f"train_eval.tasks.{name}.kind={kind!r}: during training only {', '.join(OWN_DATA_KINDS)} "
                              "(the run's own splits are val/*; evaluate.py scores the others)")
        if task.get(DATA_KEYS[kind]) is None:
            log.warning("train_eval.tasks.%s.%s is not set: %s is not scored during training (pass "
                        "train_eval.tasks.%s.%s=<path>)", name, DATA_KEYS[kind], name, name, DATA_KEYS[kind])
            continue
        keep[name] = task
    if not keep:
        return {}
    try:
        return suite_tasks(OmegaConf.create({"name": "train_eval", "tasks": keep}))
    except ConfigError as e:  # the suite names its keys benchmark.tasks.*
        raise ConfigError(str(e).replace("benchmark.tasks.", "train_eval.tasks.")) from None
    except FileNotFoundError as e:
        raise FileNotFoundError(str(e).replace("benchmark.tasks.", "train_eval.tasks.")) from None


class TrainingTasks(L.Callback):
    """Scores ``tasks`` with the model being trained at the end of every ``every_n_epochs``-th epoch."""

    def __init__(self, tasks: dict[str, dict], every_n_epochs: int, preprocess: Any, out_dir: Path,
                 run_cfg: DictConfig) -> None:
        self.tasks, self.every = tasks, int(every_n_epochs)
        self.preprocess, self.out_dir, self.run_cfg = preprocess, Path(out_dir), run_cfg

    def on_train_epoch_end(self, trainer: L.Trainer, module: Any) -> None:
        if not self.tasks or self.every < 1 or (trainer.current_epoch + 1) % self.every:
            return
        from ncu.eval.suite import run_suite  # (the tasks import ncu.run, which imports this module)
        from ncu.eval.tasks import Context

        was = module.model.training
        ctx = Context(module.model, self.preprocess, module.tokenizer, module.device, self.out_dir, self.run_cfg, {})
        try:
            with torch.no_grad():
                metrics, _ = run_suite(self.tasks, ctx)
        finally:
            module.model.train(was)
        for key, value in metrics.items():  # every rank scores the tasks whole, as the val split
            module.log(f"val/{key.removeprefix('eval/')}", torch.tensor(value, dtype=torch.float64), sync_dist=False)
