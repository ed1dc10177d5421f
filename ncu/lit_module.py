"""The LightningModule: one open_clip model, trained through an ordered list of stages.

``set_stage`` (called by ``ncu.run.train`` before each ``trainer.fit``) fixes the stage's objective, which
parameters train and its optimizer. Each training step: encode, gather the global batch, score pairs
for noisy correspondence, compute the stage's objective. Validation/test: retrieval and zero-shot.
"""
from __future__ import annotations

import math
import random
import time
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate

from ncu import accum, detectors, stages
from ncu.choices import ANCHORS, NEGATION_HEADS
from ncu.data.resumable import ResumableLoader
from ncu.data.stats import batch_size_of
from ncu.errors import DivergedError
from ncu.eval.detection import NCDetectionMeter
from ncu.eval.module import Evaluation, shift_tensors
from ncu.models.negation import (NegationHead, NegationPrompt, anchor_at_angle, build_negated_tokens,
                                 negated_text_features, text_tower)
from ncu import objectives
from ncu.objectives import ncu as ncu_obj
from ncu.text_aug import CaptionPerturber

LOG_SCALE_MAX = math.log(100.0)


class CLIPUnlearner(Evaluation, L.LightningModule):
    def __init__(self, model: torch.nn.Module, tokenizer: Any, method: dict, optim: dict,
                 config: dict | None = None):
        super().__init__()
        # The full run config travels with every checkpoint (evaluate.py rebuilds the run from it).
        self.save_hyperparameters({"config": config or {}})
        self.model, self.tokenizer = model, tokenizer
        self.method, self.optim = dict(method), dict(optim)
        # optim.accum_freq > 1: the module takes its own optimizer steps, one per K micro-batches (accumulate).
        self.accum_freq = int(self.optim["accum_freq"])
        self.automatic_optimization = self.accum_freq == 1
        self.micro_batches: list[tuple[dict, accum.MicroBatch]] = []
        self.epoch_batches = 0  # training batches of the current epoch so far (a checkpoint's loader position)
        self._loader_position: dict[str, Any] | None = None
        seed = self.hparams["config"]["seed"]
        neg = self.method["negation"]
        self.negation_mode = neg["mode"]
        self.prompt, self.negation_head, self.perturber, self.anchor, self.anchor_cos = None, None, None, "none", None
        if self.negation_mode != "none":  # the negated path's options exist only then (ncu.yaml)
            self.prompt = (NegationPrompt.for_model(model, neg["n_ctx"], neg["init_std"])
                           if self.negation_mode == "prompt" else None)
            # Optional learned map on the negated path (NegationHead), started at head_cos (null: the band's centre).
            if neg["head"] not in NEGATION_HEADS:
                raise ValueError(f"method.negation.head={neg['head']!r} is unknown; choose from {NEGATION_HEADS}")
            centre = sum(self.method["band"]) / 2
            if neg["head"] == "rotation":
                self.negation_head = NegationHead.for_model(
                    model, centre if neg["head_cos"] is None else neg["head_cos"], seed)
            # anchor=band: t~ at a fixed angle from its own caption (the band's centre, or anchor_cos).
            self.anchor = neg["anchor"]
            if self.anchor not in ANCHORS:
                raise ValueError(f"method.negation.anchor={self.anchor!r} is unknown; choose from {ANCHORS}")
            self.anchor_cos = centre if neg["anchor_cos"] is None else float(neg["anchor_cos"])
            perturb = neg["perturb"]
            if perturb["enabled"]:
                self.perturber = CaptionPerturber(ops=perturb["ops"], alpha=perturb["alpha"], seed=seed,
                                                  require_wordnet=perturb["require_wordnet"])
        self.template_rng = random.Random(seed)
        # The solver block run.build adds beside the method (the solver group); objectives without OT have none.
        self.solver = instantiate(self.method["solver"]) if self.method.get("solver") else None
        self.detect = NCDetectionMeter()
        # Which pairs are flagged (ncu/detectors.py): the method's detector until a stage brings its own; the
        # per-sample detectors' memory of every training pair spans all stages (attach_data sets num_train).
        self.detection = dict(self.method["detection"])
        self.flagger = detectors.build(self.method["detector"], self.detection)
        self.memory = detectors.SampleMemory()
        self.pass_seconds = float("nan")
        self._epoch_start = time.perf_counter()
        self.stage_name, self.stage, self.stage_index = "none", {}, None
        # Before set_stage (a module driven by hand, an evaluation): plain InfoNCE, acting on no flags.
        self.objective, self.objective_options = objectives.get("clip"), {}
        # The current stage's compute: training pairs seen (all ranks) and wall seconds of its fits (with their
        # scoring passes); saved in checkpoints, so a resumed stage and a cached pre-training keep their cost.
        self.cost = {"samples": 0, "seconds": 0.0}
        self._fit_start: float | None = None
        self.test_prefix = "test"  # run.train sets "pretrain" to evaluate the model before fine-tuning
        self._eval_feats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # The last step's (features, pair scores, noise labels) and the last val features, detached references
        # the dashboard callback reads when it is on (ncu/callbacks.py keeps its own buffers).
        self.last_step: tuple[objectives.Batch, torch.Tensor, torch.Tensor] | None = None
        self.last_val_features: tuple[torch.Tensor, torch.Tensor] | None = None
        self.classnames: list[str] = []
        self.eval_labels: dict[str, torch.Tensor] = {}
        # A dedicated zero-shot set (images, labels over ``classnames``); else val/test images by category.
        self.zeroshot_set: tuple[torch.Tensor, torch.Tensor] | None = None
        # Other styles of the test data (data.shifts): per style its test images and caption tokens, zero-shot
        # images, labels and class names; scored with every test split (``<prefix>/<style>/<metric>``).
        self.shift_sets: dict[str, dict[str, Any]] = {}
        self._attached_dm: Any = None  # the data module these facts were read from (attach_data)

    # ----- data -------------------------------------------------------------------------------------
    def attach_data(self, dm: Any) -> None:
        """What the module reads from its data module: the training split's size (per-sample detectors keep one
        score per pair), the class names and labels of zero-shot evaluation, and the shifted styles' sets."""
        self._attached_dm = dm
        self.memory.num_train = dm.train_rows
        self.classnames = dm.classnames
        self.eval_labels = {split: dm.category_labels(split) for split in ("val", "test")}
        if "zeroshot" in dm.datasets:  # a dedicated zero-shot task (scenes: single objects over the vocabulary)
            zs = dm.datasets["zeroshot"]
            self.classnames = dm.zeroshot_classnames
            self.zeroshot_set = (torch.stack([zs[k]["image"] for k in range(len(zs))]), dm.category_labels("zeroshot"))
        self.shift_sets = {style: shift_tensors(sets) for style, sets in dm.shifts.items()}

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is not None and dm is not self._attached_dm and hasattr(dm, "category_labels"):
            self.attach_data(dm)  # a Trainer given another PairDataModule than the one the module was built with

    # ----- stages -----------------------------------------------------------------------------------
    def set_stage(self, name: str, stage: dict) -> list[str]:
        try:
            objective = objectives.get(stage["objective"])
        except ValueError as e:
            raise ValueError(f"stage {name!r}: {e}") from None
        if objective.negation == "required" and self.negation_mode == "none":
            raise ValueError(f"stage {name!r}: objective {objective.name} needs method.negation.mode=prompt or "
                             "template")
        self.stage_name, self.stage = name, dict(stage)
        # What the step calls, with its options read once for the stage (the dashboard uses the same).
        self.objective, self.objective_options = objective, objective.options(self.method, self.solver)
        self.cost = {"samples": 0, "seconds": 0.0}
        # A stage may bring its own detector settings (a robust pre-training): over the method's.
        self.detection = {**self.method["detection"], **stage["detection"]}
        self.flagger = detectors.build(self.detector, self.detection)
        freeze = list(stage["freeze"])
        if not objective.learns_negation:  # the negated path is learned in the hardest-negative stage only
            freeze += [p for p, m in (("prompt.*", self.prompt), ("negation_head.*", self.negation_head))
                       if m is not None]
        if stage["freeze_token_embedding"]:
            freeze.append(f"model.{stages.text_prefix(self.model)}token_embedding.*")
        n_blocks = stages.text_blocks_to_freeze(self.model, stage["freeze_text_blocks"])
        freeze += [f"model.{stages.text_prefix(self.model)}transformer.resblocks.{i}.*" for i in range(n_blocks)]
        train = list(stage["train"])
        if objective.learns_negation and self.negation_head is not None:
            train.append("negation_head.*")  # part of the negated path: learned with the prompt
        return stages.set_trainable(self, train, freeze, stage["unfreeze"])

    def configure_optimizers(self):
        st = self.stage
        optimizer = stages.make_adamw(self, st, self.optim)
        total = int(self.trainer.estimated_stepping_batches)
        if self.accum_freq > 1:  # one step per K micro-batches; an epoch's last partial group makes none
            epochs = max(1, int(self.trainer.max_epochs))
            total = total // epochs // self.accum_freq * epochs
        total = max(1, total)
        scheduler = stages.make_scheduler(optimizer, total, st["warmup"], st["min_lr_ratio"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The stage and every RNG the training loop draws from, so a resumed stage continues exactly.
        checkpoint["ncu_stage_index"] = self.stage_index
        checkpoint["ncu_stage_name"] = self.stage_name
        checkpoint["ncu_cost"] = self.cost_so_far()
        loader = self.trainer.train_dataloader if self.has_trainer else None
        if isinstance(loader, ResumableLoader) and 0 < self.epoch_batches < self.trainer.num_training_batches:
            position = loader.position(self.epoch_batches)  # inside an epoch (checkpoint.every_n_steps)
            if position is not None:
                checkpoint["ncu_loader"] = {**position, "epoch": self.current_epoch, "batches": self.epoch_batches}
        if self.memory.history is not None:
            checkpoint["ncu_sample_history"] = self.memory.history.detach().cpu()
        checkpoint["ncu_rng"] = {
            "torch": torch.get_rng_state(), "python": random.getstate(), "numpy": stages.numpy_state_to_safe(),
            "perturber": self.perturber.rng.getstate() if self.perturber is not None else None,
            "template": self.template_rng.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.memory.restore(checkpoint, self.device)
        self._loader_position = checkpoint.get("ncu_loader")  # applied when the fit starts (on_train_start)
        if checkpoint.get("ncu_stage_index") == self.stage_index and checkpoint.get("ncu_cost"):
            self.cost = dict(checkpoint["ncu_cost"])  # resumed inside the stage: its cost so far
        rng = checkpoint.get("ncu_rng")
        if rng is None:
            return
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        stages.numpy_state_from_safe(rng["numpy"])
        if self.perturber is not None and rng["perturber"] is not None:
            self.perturber.rng.setstate(rng["perturber"])
        self.template_rng.setstate(rng["template"])

    # ----- features ---------------------------------------------------------------------------------
    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The global batch: all ranks' rows, with gradients flowing back to each rank's own rows."""
        if self.world_size == 1:
            return x
        return self.all_gather(x, sync_grads=x.requires_grad).flatten(0, 1)

    def negated_tokens(self, captions: list[str], perturb: bool = True) -> torch.Tensor:
        """Tokens of the negated ``captions`` (their EDA perturbation and templates drawn here, once)."""
        neg = self.method["negation"]
        return build_negated_tokens(self.tokenizer, captions, neg["n_ctx"], self.perturber if perturb else None,
                                    self.negation_mode, neg["templates"],
                                    self.template_rng if perturb else random.Random(0))

    def encode_negated(self, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """t~ of negated tokens (their own caption features ``t`` are the anchor when ``anchor=band``)."""
        e = negated_text_features(self.model, self.prompt, tokens.to(self.device), self.negation_mode,
                                  self.negation_head)
        return anchor_at_angle(t, e, self.anchor_cos) if self.anchor == "band" else e

    def negated_features(self, captions: list[str], t: torch.Tensor, perturb: bool = True) -> torch.Tensor:
        """t~ of ``captions`` (their own caption features ``t`` are the anchor when ``anchor=band``)."""
        return self.encode_negated(self.negated_tokens(captions, perturb), t)

    @torch.no_grad()
    def mean_cos_t_tn(self, captions: list[str], chunk: int = 256) -> float:
        """Mean cos(t, t~) over ``captions``, negated without the random perturbation (no RNG is drawn)."""
        was = self.training
        self.eval()
        total = 0.0
        for i in range(0, len(captions), chunk):
            part = captions[i:i + chunk]
            t = self.model.encode_text(self.tokenizer(part).to(self.device), normalize=True).float()
            total += float((t * self.negated_features(part, t, perturb=False).float()).sum())
        self.train(was)
        return total / max(1, len(captions))

    def quota(self, scores: torch.Tensor) -> torch.Tensor:
        """The paper's per-batch rule: the k = floor(nc_ratio * N) lowest scores of the batch (``nc_count``)."""
        return ncu_obj.select_nc(scores, self.method["nc_ratio"], self.method["nc_count"])

    @property
    def detector(self) -> str:
        """The stage's own detector (a robust pre-training's) or the method's."""
        return (self.stage["detector"] if self.stage else None) or self.method["detector"]

    def warming_up(self) -> bool:
        """Inside the stage's ``flag_after`` warm-up epochs (plain InfoNCE before a detector acts)."""
        epoch = self.current_epoch if self.has_trainer else 0
        return bool(self.stage) and epoch < int(self.stage["flag_after"])

    def flag(self, scores: torch.Tensor, noisy: torch.Tensor,
             index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flagged, detection scores)`` of a (global) batch by the stage's detector (ncu/detectors.py); none
        inside the warm-up, and the per-batch quota (for the metrics) where the objective acts on no flags."""
        if self.warming_up():
            return torch.zeros_like(scores, dtype=torch.bool), scores
        if self.flagger.per_sample:
            if not self.objective.flags:
                return self.quota(scores), scores
            if index is None or bool((index < 0).any()):
                raise ValueError(f"method.detector={self.detector!r} needs the sample index of every training pair")
        return self.flagger.flag(scores, noisy, index, self.memory, self.quota)

    def refresh_flags(self) -> None:
        """The detector's epoch start (a mixture fit for gmm, and ema with cut=gmm), after the warm-up."""
        if not self.warming_up():
            seed = int(self.hparams["config"]["seed"])
            self.flagger.refresh(self.memory, self.scoring_pass, seed, self.device)

    @torch.no_grad()
    def scoring_pass(self) -> torch.Tensor | None:
        """Every training sample's score, batch by batch as training sees them (the data module's
        ``scoring_loader``: training-sized batches of a seeded order, evaluation transforms). Under DDP rank r
        takes batches r, r+W, ... and the ranks sum their parts: the same scores as one process. None when
        the source has no such loader (shards)."""
        dm = self.trainer.datamodule if self.has_trainer else None
        seed = int(self.hparams["config"]["seed"]) + self.current_epoch
        loader = dm.scoring_loader(seed) if dm is not None and hasattr(dm, "scoring_loader") else None
        if loader is None:
            return None
        start, was = time.perf_counter(), self.training
        self.eval()
        world, rank = self.world_size, self.global_rank
        total = torch.zeros(self.memory.num_train, dtype=torch.float64, device=self.device)
        count = torch.zeros(self.memory.num_train, dtype=torch.float64, device=self.device)
        for batch, scores in self._scored_batches(loader, lambda i: i % world == rank):
            index = torch.as_tensor(batch["index"], device=self.device).long()
            total.index_add_(0, index, scores.double())
            count.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
        if world > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        self.train(was)
        self.pass_seconds = time.perf_counter() - start
        return torch.where(count > 0, total / count.clamp(min=1), torch.nan).float()

    @torch.no_grad()
    def detection_pass(self, loader: Any) -> dict[str, float]:
        """NC detection of the current model over a whole split, batch by batch as in training (eval mode,
        the loader's transforms): its scores, and the per-batch quota of ``nc_ratio`` as flags whatever the
        run's detector (this measures the model, not the oracle). Undefined metrics (AUROC with one class)
        are left out."""
        was = self.training
        self.eval()
        meter = NCDetectionMeter().to(self.device)
        for batch, scores in self._scored_batches(loader):
            meter.update(scores, batch["noisy"].to(self.device), self.quota(scores))
        self.train(was)
        return {k: val for k, val in meter.compute().items() if not math.isnan(val)}

    def _scored_batches(self, loader: Any, take: Any = None) -> Any:
        """``(batch, own-caption scores)`` of the loader's batches (those whose number ``take`` accepts)."""
        s = self.logit_scale()
        for i, batch in enumerate(loader):
            if take is None or take(i):
                v = self.model.encode_image(batch["image"].to(self.device), normalize=True)
                t = self.model.encode_text(batch["text"].to(self.device), normalize=True)
                yield batch, ncu_obj.nc_scores(v, t, s)

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.has_trainer else 1

    @property
    def has_trainer(self) -> bool:
        """Attached to a Trainer (``self.trainer`` raises when not: the tests call steps on a bare module)."""
        return self._trainer is not None

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def stop_if_not_finite(self, value: torch.Tensor, what: str) -> None:
        """A diverged stage stops here with one line (stage, step, learning rate), before its weights are
        checkpointed, cached or evaluated as a result."""
        if bool(torch.isfinite(value).all()):
            return
        optimizers = self.trainer.optimizers if self.has_trainer else []
        lr = optimizers[0].param_groups[0]["lr"] if optimizers else (self.stage["lr"] if self.stage else float("nan"))
        step = self.trainer.global_step if self.has_trainer else 0
        raise DivergedError(f"stage {self.stage_name!r} diverged at step {step} (lr {lr:.3g}): {what} not finite; "
                            f"lower {stages.lr_key(self.stage_name)} (or add warm-up)")

    # ----- training ---------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        # Counted here, not in on_train_batch_end: a checkpoint taken after this batch (callbacks' hooks run
        # before the module's) holds it.
        self.epoch_batches += 1
        if self.accum_freq > 1:
            return accum.accumulate(self, batch)
        self.cost["samples"] += batch_size_of(batch) * self.world_size
        return self.batch_loss(self.encode_train(self.train_inputs(batch)), [batch])

    def train_inputs(self, batch: dict) -> dict:
        """What encoding a training batch takes: its images and tokens, and its negated tokens when the
        objective uses the negated path (their random perturbation drawn now, so a second encoding reuses it)."""
        inputs = {"image": batch["image"], "text": batch["text"]}
        if self.objective.negation != "none" and self.negation_mode != "none":
            inputs["negated"] = self.negated_tokens(batch["caption"])
        return inputs

    def encode_train(self, inputs: dict) -> dict[str, torch.Tensor]:
        """This process's features of a training batch: v, t and t~ (when the objective uses it)."""
        v = self.model.encode_image(inputs["image"], normalize=True)
        t = self.model.encode_text(inputs["text"], normalize=True)
        features = {"v": v, "t": t}
        if "negated" in inputs:
            features["tn"] = self.encode_negated(inputs["negated"], t)
        return features

    def batch_loss(self, local: dict[str, torch.Tensor], batches: list[dict]) -> torch.Tensor:
        """The stage's objective over the global batch: this process's features ``local`` of ``batches`` (one,
        or the micro-batches of an accumulated step) gathered over the processes, scored for noisy
        correspondence, flagged, and the loss with its parts logged."""
        v_local, t_local = local["v"], local["t"]
        v, t = self.gather(v_local), self.gather(t_local)
        noisy = self.gather(torch.cat([b["noisy"] for b in batches]).to(self.device))
        s = self.logit_scale()
        scores = ncu_obj.nc_scores(v, t, s)
        self.stop_if_not_finite(scores, "the pair scores (features or logit scale) are")  # before OT sees them
        index = None
        if all("index" in b for b in batches):
            index = self.gather(torch.cat([torch.as_tensor(b["index"], device=self.device) for b in batches]))
        self.memory.observe(index, scores, self.detection["momentum"], self.device)
        flagged, detection_scores = self.flag(scores, noisy, index)
        self.detect.update(detection_scores, noisy, flagged)
        tn = self.gather(local["tn"]) if "tn" in local else None
        features = objectives.Batch(v, t, s, flagged, tn, v_local, t_local, self.global_rank, self.world_size)
        loss, parts = self.objective.loss(features, **self.objective_options)
        self.last_step = (objectives.Batch(v.detach(), t.detach(), s.detach(), flagged,
                                           tn.detach() if tn is not None else None), scores.detach(), noisy)
        self.stop_if_not_finite(loss, "the loss is")
        bs = len(v_local)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/logit_scale", s.detach(), batch_size=bs)
        self.log("train/flagged_noisy_frac", noisy[flagged].float().mean() if flagged.any() else 0.0,
                 batch_size=bs)
        for k, val in parts.items():
            self.log(f"train/{k}", val, batch_size=bs)
        if tn is not None:
            self.log("train/cos_t_tn", (t.detach().float() * tn.detach().float()).sum(1).mean(), batch_size=bs)
        return loss

    def cost_so_far(self) -> dict[str, float]:
        running = time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0
        return {"samples": int(self.cost["samples"]), "seconds": float(self.cost["seconds"]) + running}

    def on_fit_start(self) -> None:
        self._fit_start = time.perf_counter()

    def on_fit_end(self) -> None:
        self.cost = self.cost_so_far()
        self._fit_start = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # open_clip's convention (and NCU stage 2): keep the temperature above 1/100.
        if self.stage["clamp_logit_scale"]:
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, LOG_SCALE_MAX)

    def on_train_start(self) -> None:
        # Resumed from a checkpoint taken inside an epoch: the loader continues that epoch's order and random
        # state (ncu/data/resumable.py). Lightning calls no on_train_epoch_start for the resumed epoch.
        loader, position, self._loader_position = self.trainer.train_dataloader, self._loader_position, None
        if position is not None and isinstance(loader, ResumableLoader) and position["epoch"] == self.current_epoch:
            loader.resume(position)
            self.epoch_batches = int(position["batches"])

    def on_train_epoch_start(self) -> None:
        self.epoch_batches = 0
        self.pass_seconds = float("nan")
        if self.objective.flags:
            self.refresh_flags()
        self._epoch_start = time.perf_counter()  # after the scoring pass: the epoch it is compared with

    def on_train_epoch_end(self) -> None:
        self.micro_batches = []  # a last group of fewer than optim.accum_freq micro-batches: not a whole step
        for k, val in self.detect.compute().items():
            if not math.isnan(val):  # AUROC/AUPRC are undefined without noisy pairs (rate 0)
                self.log(f"train/nc_{k}", val)
        self.detect.reset()
        if self.flagger.per_sample and not math.isnan(self.memory.rate_est):
            self.log("train/nc_rate_est", self.memory.rate_est)
        if not math.isnan(self.pass_seconds):  # the scoring pass's cost, also as a fraction of the epoch's
            self.log("train/nc_pass_seconds", self.pass_seconds)
            epoch_seconds = max(1e-9, time.perf_counter() - self._epoch_start)
            self.log("train/nc_pass_epoch_frac", self.pass_seconds / epoch_seconds)
