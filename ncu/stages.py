"""Stage plumbing: which parameters train (freeze rules), optimizer groups, the warm-up + cosine schedule, the RNG
state checkpoints carry, the checks a stage's result must pass, and the key of the shared pre-training cache."""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ncu.choices import added_later_flat, cache_key_view

from ncu.models.negation import text_tower


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


def text_prefix(model: torch.nn.Module) -> str:
    """Where the text tower's parameters live: ``""`` for open_clip CLIP, ``"text."`` for CustomTextCLIP."""
    return "" if hasattr(model, "token_embedding") else "text."


def text_blocks_to_freeze(model: torch.nn.Module, amount: float | int) -> int:
    """``amount`` as a block count (int) or a fraction of the text blocks (float < 1, rounded)."""
    n = len(text_tower(model).transformer.resblocks)
    count = round(amount * n) if isinstance(amount, float) and amount < 1 else int(amount)
    if not 0 <= count <= n:
        raise ValueError(f"freeze_text_blocks={amount!r}: the text tower has {n} blocks")
    return count


def numpy_state_to_safe() -> dict:
    """numpy's RNG state as tensors and numbers, so checkpoints load with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def numpy_state_from_safe(state: dict) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached"]))


def non_finite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of the parameters holding NaN or inf (a diverged model). Buffers are left out: attention masks
    hold -inf by design."""
    return [name for name, x in module.named_parameters() if not bool(torch.isfinite(x).all())]


def lr_key(stage: str) -> str:
    """The config key of a stage's learning rate."""
    return "pretrain.stage.lr" if stage == "pretrain" else f"method.stages.{stage}.lr"


# ----- the shared pre-training cache ---------------------------------------------------------------------
def pretrain_cache_path(cfg: DictConfig, stage: dict, dataset: str) -> Path | None:
    """Where the pre-trained checkpoint of this (model, data, noise, pre-training recipe, seed) is kept.

    Sweeps over methods share it instead of pre-training again; any change to what pre-training
    depends on gives another key. ``dataset`` is the data module's ``dataset_key``, which also tells
    which embedded sources were present (TuxPaint is optional), as the noise artifacts are keyed."""
    if not cfg.pretrain.cache:
        return None
    spec = {**pretrain_spec(cfg, stage), "dataset": dataset}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    n = cfg.noise
    name = f"{cfg.model.name}_{dataset}_{n.protocol}{n.rate:g}-ns{n.seed}_seed{cfg.seed}_{key}.ckpt"
    return Path(cfg.paths.pretrain_dir) / name


def pretrain_spec(cfg: DictConfig, stage: dict) -> dict:
    """What a pre-training's result depends on (model, data, noise, the stage's recipe, seed, optimiser,
    trainer numerics): the key of the shared cache, and what a resume compares for a pre-training."""
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
            if k not in ("cache_dir", "shifts")}  # where the scenes are kept, and the evaluation-only styles
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
             if k not in ("grad_checkpointing", "compile")}  # memory and speed switches: the same numbers
    model = cache_key_view("model", model)
    spec = {
        "model": model, "data": cache_key_view("data", data), "noise": cfg.noise,
        "stage": cache_key_view("stage", stage),
        "seed": cfg.seed,
        # the cache also carries each sample's history (ncu_sample_history), averaged with this momentum (a
        # config saved before every method had it: the momentum that applied then)
        "history_momentum": OmegaConf.select(cfg, "method.detection.momentum",
                                             default=added_later_flat()["method.detection.momentum"]),
        "optim": cache_key_view("optim", {k: v for k, v in cfg.optim.items() if k != "stage_defaults"}),
        "trainer": {k: cfg.trainer.get(k) for k in ("precision", "limit_train_batches", "accumulate_grad_batches",
                                                  "gradient_clip_val")},
    }
    return OmegaConf.to_container(OmegaConf.create(spec), resolve=True)
