"""Baseline fine-tuning objectives on (already gathered, L2-normalised) features."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss


_CLIP_LOSS = ClipLoss()  # world_size 1: features arrive already gathered


def clip_loss(v: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: open_clip's ``ClipLoss`` on one (global) batch."""
    return _CLIP_LOSS(v, t, s)


def per_pair_clip_loss(v: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-pair symmetric InfoNCE (N,), over the whole batch's candidates."""
    logits = s * v @ t.T
    labels = torch.arange(len(v), device=v.device)
    return 0.5 * (F.cross_entropy(logits, labels, reduction="none")
                  + F.cross_entropy(logits.T, labels, reduction="none"))


def filter_loss(v: torch.Tensor, t: torch.Tensor, s: torch.Tensor, flagged: torch.Tensor) -> torch.Tensor:
    """InfoNCE restricted to the pairs not flagged as noisy (flagged pairs leave the batch entirely)."""
    keep = ~flagged
    return clip_loss(v[keep], t[keep], s)


def grad_ascent_loss(v: torch.Tensor, t: torch.Tensor, s: torch.Tensor, flagged: torch.Tensor,
                     ascent_weight: float = 1.0, bound: float | None = None) -> torch.Tensor:
    """Descent on unflagged pairs, bounded ascent on flagged ones (the standard unlearning baseline).

    The ascent term is ``min(loss_flagged, bound)``: once a flagged pair's InfoNCE loss exceeds ``bound``
    (default ln N, the loss of a uniform guess) it stops pushing, so the objective cannot diverge.
    """
    per_pair = per_pair_clip_loss(v, t, s)
    bound = math.log(len(v)) if bound is None else bound
    descent = per_pair[~flagged].mean() if (~flagged).any() else per_pair.sum() * 0
    ascent = per_pair[flagged].clamp(max=bound).mean() if flagged.any() else per_pair.sum() * 0
    return descent - ascent_weight * ascent
