"""The objectives a stage trains with, one registry entry each, resolved once per stage.

An entry holds the loss (a function of one training batch's features and the entry's options), how its
options are read from the method config (once, when the stage starts), and what the step must prepare: the
detector's flags, the negated captions. The dashboard shows the soft targets an entry declares with the very
options its loss uses. A new objective is one ``register(Objective(...))`` and a ``conf/method`` file whose stage
names it (``objective: <name>``).

This module imports no torch: config validation reads the registry's names and flags at start-up; the losses
import their math when first called.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Batch:
    """One training batch as the objectives see it: L2-normalised features gathered over the ranks (``v``,
    ``t``, the negated captions ``tn`` when the stage computes them), the logit scale, the flags, and each
    rank's own rows (open_clip's local loss)."""

    v: torch.Tensor
    t: torch.Tensor
    s: torch.Tensor
    flagged: torch.Tensor
    tn: torch.Tensor | None = None
    v_local: torch.Tensor | None = None
    t_local: torch.Tensor | None = None
    rank: int = 0
    world: int = 1


Loss = Callable[..., "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def no_options(method: dict, solver: Any) -> dict:
    return {}


@dataclass(frozen=True)
class Objective:
    """``loss(batch, **options)`` returns ``(loss, parts)`` (parts: detached terms, logged as ``train/<k>``);
    ``options(method, solver)`` reads its keyword arguments from the method config; ``flags``: it acts on the
    detector's flags; ``negation``: "none" (never), "optional" (the negated captions when the method has a
    negation path) or "required"; ``learns_negation``: the negated path (prompt, head) trains in its stage;
    ``targets(batch, **options)``: the image->text soft targets the loss fits, or None (dashboard)."""

    name: str
    loss: Loss
    options: Callable[[dict, Any], dict] = no_options
    flags: bool = False
    negation: str = "none"
    learns_negation: bool = False
    targets: Callable[..., "torch.Tensor | None"] | None = None


REGISTRY: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    REGISTRY[objective.name] = objective
    return objective


def get(name: str) -> Objective:
    if name not in REGISTRY:
        raise ValueError(f"unknown objective {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


def flag_objectives() -> tuple[str, ...]:
    return tuple(name for name, objective in REGISTRY.items() if objective.flags)


# ----- the project's objectives ---------------------------------------------------------------------------
def _clip(b: Batch, local_loss: bool = False) -> tuple[torch.Tensor, dict]:
    from ncu.objectives import baselines

    if local_loss and b.world > 1:
        from open_clip.loss import ClipLoss

        # open_clip's local loss: each rank scores its own rows against the global batch (N/W x N logits).
        loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=b.rank, world_size=b.world)(
            b.v_local, b.t_local, b.s)
        return loss, {}
    return baselines.clip_loss(b.v, b.t, b.s), {}


def _filter(b: Batch) -> tuple[torch.Tensor, dict]:
    from ncu.objectives import baselines

    return baselines.filter_loss(b.v, b.t, b.s, b.flagged), {}


def _grad_ascent(b: Batch, weight: float, bound: float | None) -> tuple[torch.Tensor, dict]:
    from ncu.objectives import baselines

    return baselines.grad_ascent_loss(b.v, b.t, b.s, b.flagged, weight, bound), {}


def _ncu_hn(b: Batch, **options: Any) -> tuple[torch.Tensor, dict]:
    from ncu.objectives import ncu as ncu_obj

    return ncu_obj.stage1_loss(b.v, b.t, b.tn, b.s, ~b.flagged, **options)


def _ncu_hn_options(m: dict, solver: Any) -> dict:
    w = m["stage1"]
    return {"w_cyc": w["w_cyc"], "w_band": w["w_band"], "w_sig_pos": w["w_sig_pos"], "w_sig_neg": w["w_sig_neg"],
            "band": tuple(m["band"]), "detach_t": w["detach_t"]}


def _unlearn_options(m: dict, solver: Any) -> dict:
    u = m["unlearn"]
    return {"gamma": m["gamma"], "solver": solver, "normalize_t2v": u["normalize_t2v"],
            "reuse_transpose": u["reuse_transpose"], "w_band": u["w_band"], "band": tuple(m["band"]),
            "flagged_captions": u["flagged_captions"], "hn_capacity": u["hn_capacity"], "w_flagged": u["w_flagged"],
            "detach_hn": u["detach_hn"]}


def _ncu_unlearn(b: Batch, **options: Any) -> tuple[torch.Tensor, dict]:
    from ncu.objectives import ncu as ncu_obj

    return ncu_obj.stage2_loss(b.v, b.t, b.tn, b.s, b.flagged, use_hn=b.tn is not None, **options)


def _unlearn_targets(b: Batch, gamma: float, solver: Any, normalize_t2v: bool, reuse_transpose: bool,
                     flagged_captions: str, hn_capacity: str, **_: Any) -> torch.Tensor | None:
    """The OT soft targets of the image rows, as ``stage2_loss`` builds them (last column: own hardest negative)."""
    import torch

    from ncu.objectives import ncu as ncu_obj

    if gamma <= 0:
        return None
    sim = b.v @ b.t.T
    A = torch.cat([sim, (b.v * b.tn).sum(-1, keepdim=True)], 1) if b.tn is not None else sim
    yv, _ = ncu_obj.ot_targets(A, b.flagged, gamma, solver, use_hn=b.tn is not None, normalize_t2v=normalize_t2v,
                               reuse_transpose=reuse_transpose, flagged_captions=flagged_captions,
                               hn_capacity=hn_capacity)
    return yv


register(Objective("clip", _clip, lambda m, solver: {"local_loss": bool(m["local_loss"])}))
register(Objective("filter", _filter, flags=True))
register(Objective("grad_ascent", _grad_ascent, lambda m, solver: {
    "weight": m["grad_ascent"]["weight"], "bound": m["grad_ascent"]["bound"]},
    flags=True))
register(Objective("ncu_hn", _ncu_hn, _ncu_hn_options, flags=True, negation="required", learns_negation=True))
register(Objective("ncu_unlearn", _ncu_unlearn, _unlearn_options, flags=True, negation="optional",
                   targets=_unlearn_targets))
