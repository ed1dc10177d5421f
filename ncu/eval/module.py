"""The Lightning module's validation and test passes (a mixin of ``CLIPUnlearner``): each split's features
gathered whole, retrieval and zero-shot on them, and on the test split each shifted style's."""
from __future__ import annotations

from typing import Any

import torch

from ncu import stages
from ncu.errors import DivergedError
from ncu.eval.retrieval import retrieval_metrics
from ncu.eval.zeroshot import zero_shot_accuracy, zero_shot_classifier

ZS_TEMPLATES = ("{}.", "a picture of {}.", "an icon of {}.", "a drawing of {}.")


def shift_tensors(sets: dict[str, Any]) -> dict[str, Any]:
    """A style's sets (``PairDataModule.shifts``) as the tensors ``CLIPUnlearner.shift_metrics`` scores."""
    test, zs = sets["test"], sets["zeroshot"]
    index = {c: i for i, c in enumerate(sets["classnames"])}
    items = [test[k] for k in range(len(test))]
    return {"images": torch.stack([it["image"] for it in items]), "texts": torch.stack([it["text"] for it in items]),
            "zs_images": torch.stack([zs[k]["image"] for k in range(len(zs))]),
            "zs_labels": torch.tensor([index[c] for c in zs.frame["category"]], dtype=torch.long),
            "classnames": sets["classnames"]}


class Evaluation:
    """Validation and test hooks. The module provides ``model``, ``tokenizer``, the evaluation facts its data
    module gave it (``attach_data``: ``eval_labels``, ``classnames``, ``zeroshot_set``, ``shift_sets``) and
    ``test_prefix``; metrics are logged under ``<prefix>/<metric>`` (``trainer.test``/``validate`` return them)."""

    def _eval_step(self, batch: dict) -> None:
        v = self.model.encode_image(batch["image"], normalize=True)
        t = self.model.encode_text(batch["text"], normalize=True)
        self._eval_feats.append((v.float(), t.float(), torch.as_tensor(batch["index"], device=v.device)))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Normalised features of preprocessed images (a small set every rank encodes whole)."""
        return torch.cat([self.model.encode_image(images[i:i + chunk].to(self.device), normalize=True).float()
                          for i in range(0, len(images), chunk)])

    def _eval_end(self, split: str, prefix: str) -> None:
        v, t, index = (torch.cat([f[i] for f in self._eval_feats]) for i in range(3))
        self._eval_feats.clear()
        if self.has_trainer and self.trainer.world_size > 1:
            # Evaluation sets are small: score them whole on every rank. The distributed sampler interleaves
            # ranks and pads with repeats: back to dataset order, each sample once.
            v, t, index = (self.all_gather(x).flatten(0, 1) for x in (v, t, index))
            order = torch.argsort(index, stable=True)
            first = torch.ones_like(order, dtype=torch.bool)
            first[1:] = index[order][1:] != index[order][:-1]
            v, t = v[order[first]], t[order[first]]
        if not (bool(torch.isfinite(v).all()) and bool(torch.isfinite(t).all())):
            raise DivergedError(f"the model's {split} features are not finite (a diverged model, at stage "
                                f"{self.stage_name!r}: lower {stages.lr_key(self.stage_name)} if it trained it); it is "
                                "not evaluated")
        if split == "val":
            self.last_val_features = (v, t)
        metrics = retrieval_metrics(v, t, torch.arange(len(t), device=t.device))
        zs_v, labels = v, self.eval_labels.get(split)
        if self.zeroshot_set is not None:
            zs_v, labels = self.encode_images(self.zeroshot_set[0]), self.zeroshot_set[1]
        if labels is not None and len(labels) == len(zs_v) and self.classnames:
            clf = zero_shot_classifier(self.model, self.tokenizer, self.classnames, ZS_TEMPLATES, self.device)
            zs = zero_shot_accuracy(zs_v, labels.to(zs_v.device), clf, topk=(1,))
            metrics["zeroshot_top1"] = zs["top1"]
        if split == "test":
            for style, sets in self.shift_sets.items():
                metrics.update({f"{style}/{k}": val for k, val in self.shift_metrics(sets).items()})
        for k, val in metrics.items():  # float64: trainer.test/validate return them unrounded to run.py
            self.log(f"{prefix}/{k}", torch.tensor(float(val), dtype=torch.float64), prog_bar=k.endswith("rsum"),
                     sync_dist=False)

    @torch.no_grad()
    def shift_metrics(self, sets: dict[str, Any], chunk: int = 256) -> dict[str, float]:
        """Retrieval (rSum, R@1 both ways) on a style's test pairs and zero-shot top-1 over its class names (a
        small set every rank scores whole)."""
        v = self.encode_images(sets["images"], chunk)
        t = torch.cat([self.model.encode_text(sets["texts"][i:i + chunk].to(self.device), normalize=True).float()
                       for i in range(0, len(sets["texts"]), chunk)])
        r = retrieval_metrics(v, t, torch.arange(len(t), device=t.device))
        out = {"rsum": r["rsum"], "i2t_R@1": r["i2t_R@1"], "t2i_R@1": r["t2i_R@1"]}
        clf = zero_shot_classifier(self.model, self.tokenizer, sets["classnames"], ZS_TEMPLATES, self.device)
        zs_v = self.encode_images(sets["zs_images"], chunk)
        out["zeroshot_top1"] = zero_shot_accuracy(zs_v, sets["zs_labels"].to(zs_v.device), clf, topk=(1,))["top1"]
        return out

    def on_validation_epoch_start(self) -> None:
        self._eval_feats.clear()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val", "val")

    def on_test_epoch_start(self) -> None:
        self._eval_feats.clear()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test", self.test_prefix)
