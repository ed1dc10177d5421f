"""Dashboard images for wandb: NC-score histograms, the OT targets and similarities of one batch, and a
table of retrieval examples. Active only when a WandbLogger is attached (CSV runs skip the plotting)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

import torch

from ncu.eval import plots
from ncu.objectives import Batch


def _wandb(trainer: L.Trainer) -> WandbLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


class DashboardImages(L.Callback):
    def __init__(self, examples: int = 8):
        self.examples = examples
        self.tmp: Path | None = None
        self.scores: list[tuple[torch.Tensor, torch.Tensor]] = []  # the epoch's (pair scores, noise labels)
        self.batch: Batch | None = None  # the epoch's last batch

    def setup(self, trainer: L.Trainer, module: Any, stage: str) -> None:
        # PNGs only pass through here: wandb copies each one into its own run dir when it is logged.
        if self.tmp is None and _wandb(trainer) is not None and trainer.is_global_zero:
            self.tmp = Path(tempfile.mkdtemp(prefix="ncu-dash-"))

    def teardown(self, trainer: L.Trainer, module: Any, stage: str) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def on_train_epoch_start(self, trainer: L.Trainer, module: Any) -> None:
        self.scores, self.batch = [], None

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.tmp is None or module.last_step is None:
            return
        b, scores, noisy = module.last_step
        self.scores.append((scores, noisy))  # to the CPU once per epoch, not per step
        self.batch = b  # in float32 at the epoch's end, for the last batch only

    def on_train_epoch_end(self, trainer: L.Trainer, module: Any) -> None:
        logger = _wandb(trainer)
        if logger is None or self.tmp is None or not self.scores:
            return
        scores, noisy = (torch.cat(x).cpu() for x in zip(*self.scores))
        stem = f"{module.stage_name}_e{trainer.current_epoch}"
        images = {"train/nc_score_hist": plots.score_histogram(scores, noisy, self.tmp / f"hist_{stem}.png",
                                                                title=f"{module.stage_name}: NC score")}
        b = self.batch
        batch = Batch(b.v.float(), b.t.float(), b.s, b.flagged, b.tn.float() if b.tn is not None else None)
        images["train/similarity"] = plots.heatmap(batch.v @ batch.t.T, self.tmp / f"sim_{stem}.png",
                                                   "image-text cosine")
        # The objective's own targets with the options its loss used: the picture cannot drift from the loss.
        targets = module.objective.targets
        yv = targets(batch, **module.objective_options) if targets is not None else None
        if yv is not None:
            images["train/ot_targets"] = plots.heatmap(yv, self.tmp / f"ot_{stem}.png",
                                                       "OT soft targets (last column: own hardest negative)")
        for key, path in images.items():
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)

    def on_validation_epoch_end(self, trainer: L.Trainer, module: Any) -> None:
        logger = _wandb(trainer)
        feats = module.last_val_features
        if logger is None or not trainer.is_global_zero or feats is None:
            return
        v, t = feats
        captions = trainer.datamodule.datasets["val"].frame["caption"].tolist()
        top = (v[: self.examples] @ t.T).topk(min(5, len(t)), dim=1).indices.tolist()
        rows = [[captions[i], " | ".join(captions[j] for j in top[i]), i in top[i][:1]] for i in range(len(top))]
        logger.log_table(key="val/retrieval_examples", columns=["query (image of)", "top-5 captions", "correct@1"],
                         data=rows, step=trainer.global_step)
