"""Stage plumbing: which parameters train, optimizer groups, and the warm-up + cosine schedule."""
from __future__ import annotations

import fnmatch
import math
from typing import Iterable

import torch
from torch import nn


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def set_trainable(module: nn.Module, train: Iterable[str] = ("*",), freeze: Iterable[str] = (),
                  unfreeze: Iterable[str] = ()) -> list[str]:
    """Set ``requires_grad`` on every parameter (fnmatch rules on ``named_parameters`` names): trainable iff
    it matches a ``train`` pattern and either no ``freeze`` pattern or an ``unfreeze`` pattern (an
    exception to the freeze rules). Returns the trainable names."""
    train, freeze, unfreeze = list(train), list(freeze), list(unfreeze)
    for pattern in train + freeze + unfreeze:
        if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in module.named_parameters()):
            raise ValueError(f"parameter rule {pattern!r} matches no parameter of the model")
    names = []
    for name, p in module.named_parameters():
        p.requires_grad_(matches(name, train) and (not matches(name, freeze) or matches(name, unfreeze)))
        if p.requires_grad:
            names.append(name)
    return names


def param_groups(module: nn.Module, groups: dict, weight_decay: float, no_decay: Iterable[str],
                 lr: float) -> list[dict]:
    """AdamW groups over the trainable parameters.

    ``groups`` maps a group name to ``{params: [patterns], lr: ..., weight_decay: ...}``; the first group
    whose patterns match takes the parameter, the rest go to the default group (``lr``, ``weight_decay``).
    Parameters matching ``no_decay`` patterns (or 1-d: norms, biases, scales) get no weight decay.
    """
    no_decay = list(no_decay)
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    settings = {"default": {"lr": lr, "weight_decay": weight_decay}}
    for gname, g in (groups or {}).items():
        settings[gname] = {"lr": g.get("lr", lr), "weight_decay": g.get("weight_decay", weight_decay)}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        gname = next((g for g, spec in (groups or {}).items() if matches(name, spec["params"])), "default")
        decay = not (p.ndim < 2 or matches(name, no_decay))
        buckets.setdefault((gname, decay), []).append(p)
    out = []
    for (gname, decay), params in buckets.items():
        s = settings[gname]
        out.append({"params": params, "lr": s["lr"], "weight_decay": s["weight_decay"] if decay else 0.0,
                    "name": f"{gname}/{'decay' if decay else 'no_decay'}"})
    return out


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio``
    at ``total`` (clamped: no overshoot past the end)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_adamw(module: nn.Module, stage: dict, optim: dict) -> torch.optim.AdamW:
    """The stage's AdamW over :func:`param_groups` (betas and eps from the ``optim`` config)."""
    groups = param_groups(module, stage.get("groups") or {}, stage.get("weight_decay", 0.0),
                          optim.get("no_decay", []), stage["lr"])
    return torch.optim.AdamW(groups, lr=stage["lr"], betas=tuple(optim.get("betas", (0.9, 0.98))),
                             eps=optim.get("eps", 1e-8))


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float | int,
                   min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """``warmup`` < 1 is a fraction of the stage's steps, otherwise a step count."""
    warmup_steps = int(round(warmup * total_steps)) if 0 < warmup < 1 else int(warmup)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps, min_ratio)
    )
