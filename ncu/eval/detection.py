"""Noisy-correspondence detection metrics against the ground-truth noise mask.

Score convention: a LOWER score means "more likely noisy" (e.g. the InfoNCE probability of a pair's own
caption, or its cosine similarity). Ranking metrics therefore rank pairs by decreasing noisiness, which is
taken as ``sigmoid(-score)`` in float64: a strictly decreasing map into [0, 1], so torchmetrics uses it
as is. It is exact for scores of moderate magnitude (|score| below ~35, beyond which float64 saturates).

``f1_best`` is the F1 of the best cut of the scores (flag every pair below some threshold): what any rule
that cuts these scores could reach, so a detector's own F1 below it is the cut's fault and the rest the
score's.

Undefined cases: AUROC is ``nan`` when the labels hold a single class; AUPRC, ``f1_best``, recall and F1 are
``nan`` when there is no noisy pair (recall has no denominator: a clean split, noise rate 0); precision is
``nan`` when nothing is flagged; with only noisy pairs AUPRC is 1. Callers leave ``nan`` metrics out.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryAveragePrecision,
    BinaryF1Score,
    BinaryPrecision,
    BinaryPrecisionRecallCurve,
    BinaryRecall,
)
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_f1_score,
    binary_precision,
    binary_precision_recall_curve,
    binary_recall,
)


def _noisiness(scores: Tensor) -> Tensor:
    """Strictly decreasing map of the scores into [0, 1]: higher means more likely noisy."""
    return torch.sigmoid(-scores.detach().double().flatten())


def _best_f1(precision: Tensor, recall: Tensor) -> float:
    return float((2 * precision * recall / (precision + recall).clamp_min(1e-12)).max())


def _check(scores: Tensor, is_noisy: Tensor, flagged: Tensor | None) -> None:
    if scores.numel() != is_noisy.numel():
        raise ValueError(f"scores has {scores.numel()} entries but is_noisy has {is_noisy.numel()}")
    if flagged is not None and flagged.numel() != is_noisy.numel():
        raise ValueError(f"flagged has {flagged.numel()} entries but is_noisy has {is_noisy.numel()}")


def detection_metrics(scores: Tensor, is_noisy: Tensor, flagged: Tensor | None = None) -> dict[str, float]:
    """AUROC/AUPRC of the scores (lower = noisier) and, when ``flagged`` is given, precision/recall/F1.

    Args:
        scores: (N,) per-pair score, lower meaning more likely noisy.
        is_noisy: (N,) bool ground truth (True = mismatched pair).
        flagged: optional (N,) bool mask of the pairs a method flagged as noisy.

    Returns:
        ``auroc``, ``auprc`` and ``f1_best``; plus ``precision``, ``recall`` and ``f1`` of the flags (noisy = positive)
        when ``flagged`` is given. Values are floats in [0, 1], ``nan`` where undefined (module docstring).
    """
    _check(scores, is_noisy, flagged)
    target = is_noisy.detach().flatten().long()
    preds = _noisiness(scores).to(target.device)
    num_pos = int(target.sum())
    out: dict[str, float] = {}
    both_classes = 0 < num_pos < target.numel()
    out["auroc"] = float(binary_auroc(preds, target)) if both_classes else float("nan")
    out["auprc"] = float(binary_average_precision(preds, target)) if num_pos > 0 else float("nan")
    out["f1_best"] = _best_f1(*binary_precision_recall_curve(preds, target)[:2]) if num_pos > 0 else float("nan")
    if flagged is not None:
        flags = flagged.detach().flatten().long().to(target.device)
        out |= _defined({"precision": float(binary_precision(flags, target)),
                         "recall": float(binary_recall(flags, target)),
                         "f1": float(binary_f1_score(flags, target))}, num_pos, int(flags.sum()))
    return out


def _defined(flag_metrics: dict[str, float], num_pos: int, num_flagged: int) -> dict[str, float]:
    """Flag metrics with ``nan`` where undefined (torchmetrics gives 0): recall and F1 without a noisy pair,
    precision without a flagged one."""
    nan = float("nan")
    return {**flag_metrics, **({"recall": nan, "f1": nan} if num_pos == 0 else {}),
            **({"precision": nan} if num_flagged == 0 else {})}


class NCDetectionMeter(torch.nn.Module):
    """Epoch accumulator of :func:`detection_metrics`, built on torchmetrics so it syncs under DDP.

    ``update(scores, is_noisy, flagged)`` per batch, ``compute()`` at epoch end, then ``reset()``.
    With ``with_flags=False`` only ``auroc``/``auprc`` are tracked and ``flagged`` is ignored.
    """

    def __init__(self, with_flags: bool = True) -> None:
        super().__init__()
        self.with_flags = with_flags
        self.ranking = MetricCollection({"auroc": BinaryAUROC(), "auprc": BinaryAveragePrecision(),
                                         "curve": BinaryPrecisionRecallCurve()})
        self.flags = MetricCollection(
            {"precision": BinaryPrecision(), "recall": BinaryRecall(), "f1": BinaryF1Score()}
        )
        # Class counts decide whether AUROC/AUPRC are defined.
        self.num_pos = SumMetric()
        self.num_total = SumMetric()
        self.num_flagged = SumMetric()

    def update(self, scores: Tensor, is_noisy: Tensor, flagged: Tensor | None = None) -> None:
        _check(scores, is_noisy, flagged)
        if self.with_flags and flagged is None:
            raise ValueError("flagged is required when with_flags=True")
        device = self.num_total.device
        target = is_noisy.detach().flatten().long().to(device)
        self.ranking.update(_noisiness(scores).to(device), target)
        if self.with_flags:
            flags = flagged.detach().flatten().long().to(device)
            self.flags.update(flags, target)
            self.num_flagged.update(flags.sum().double())
        self.num_pos.update(target.sum().double())
        self.num_total.update(torch.tensor(float(target.numel()), dtype=torch.float64, device=device))

    def compute(self) -> dict[str, float]:
        num_pos = int(self.num_pos.compute())
        num_total = int(self.num_total.compute())
        if num_total == 0:
            raise RuntimeError("NCDetectionMeter.compute() called before any update()")
        out: dict[str, float] = {}
        both_classes = 0 < num_pos < num_total
        out["auroc"] = float(self.ranking["auroc"].compute()) if both_classes else float("nan")
        out["auprc"] = float(self.ranking["auprc"].compute()) if num_pos > 0 else float("nan")
        out["f1_best"] = _best_f1(*self.ranking["curve"].compute()[:2]) if num_pos > 0 else float("nan")
        if self.with_flags:
            out |= _defined({name: float(value) for name, value in self.flags.compute().items()}, num_pos,
                            int(self.num_flagged.compute()))
        return out

    def reset(self) -> None:
        self.ranking.reset()
        self.flags.reset()
        self.num_pos.reset()
        self.num_total.reset()
        self.num_flagged.reset()
