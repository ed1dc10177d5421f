"""open_clip models by name: architecture registry, weights (tag, file or one of our checkpoints)."""
from __future__ import annotations

import logging
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch

from ncu.errors import CheckpointError
from ncu.models.laclip import CONFIG_DIR, LACLIP_PREPROCESS, load_laclip

log = logging.getLogger(__name__)
_registered = False


def register_configs() -> None:
    """Make the architectures shipped with ncu (``ncu-micro`` ... ``ncu-small``, ``LaCLIP-ViT-B-16``) known to
    open_clip; importing ``ncu.models.laclip`` also registers the QK-norm timm ViTs of the LaCLIP config."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


@dataclass
class ModelBundle:
    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    name: str


def check_model_name(name: str) -> None:
    register_configs()
    if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        small = sorted(n for n in open_clip.list_models() if n.startswith("ncu-"))
        raise ValueError(
            f"unknown model.name {name!r}: not an open_clip architecture. Small ones shipped here: {small}; "
            "`python -c 'import open_clip; print(open_clip.list_models())'` lists the rest"
        )


def speed_switches(model: torch.nn.Module, grad_checkpointing: bool, compile: bool) -> None:
    """``model.grad_checkpointing``: open_clip's activation checkpointing in both towers. ``model.compile``:
    each tower's forward compiled in place (``nn.Module.compile``), so parameter names and checkpoints stay
    as they are (``torch.compile(model)`` would prefix them)."""
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if compile:
        towers = [model.visual, getattr(model, "text", None) or model.transformer]
        for tower in towers:
            tower.compile()


def _is_lightning_ckpt(path: str) -> bool:
    return path.endswith(".ckpt")


TRUST_HINT = "trust_checkpoints=true"


def unsafe_checkpoint_error(path: str | Path, err: Exception) -> CheckpointError:
    """The one-line refusal of a file that ``torch.load(weights_only=True)`` will not unpickle: it holds
    objects beyond tensors and plain containers, and unpickling those can run any code."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    what = f" ({found.group(1)})" if found else ""
    return CheckpointError(f"checkpoint {path} holds Python objects beyond tensors and plain data{what}; loading "
                           f"it could run code, so it is refused. Pass {TRUST_HINT} only for a file you trust")


def is_unsafe_load(err: Exception) -> bool:
    return isinstance(err, pickle.UnpicklingError) and str(err).startswith("Weights only load failed")


def read_checkpoint(path: str | Path, trusted: bool = False) -> dict[str, Any]:
    """``torch.load`` of a checkpoint file with ``weights_only=True`` unless ``trusted``; a missing, truncated,
    foreign or code-carrying file raises ``CheckpointError`` naming the path."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: file not found") from None
    except Exception as e:  # noqa: BLE001 - zip, pickle and EOF errors all mean "not a readable checkpoint"
        if is_unsafe_load(e):
            raise unsafe_checkpoint_error(path, e) from None
        raise CheckpointError(f"checkpoint {path} is not readable (truncated or not a torch checkpoint: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def check_state_dict(model: torch.nn.Module, state: dict[str, Any], path: str | Path, name: str | None = None,
                     trained_as: str | None = None, optional: tuple[str, ...] = ()) -> None:
    """Raise ``CheckpointError`` when ``state`` does not fit ``model``: names the model, the checkpoint,
    what it was trained as (when known) and the first keys that are missing, unexpected or of another shape.
    Keys starting with one of ``optional`` may be missing or unexpected."""
    own = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in own and not k.startswith(optional)]
    if not (shapes or missing or unexpected):
        return
    parts = [f"{len(shapes)} tensors of another shape (checkpoint vs model), e.g. {shapes[:3]}" if shapes else "",
             f"{len(missing)} missing, e.g. {missing[:3]}" if missing else "",
             f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}" if unexpected else ""]
    was = f" (it was trained as model.name={trained_as!r})" if trained_as and trained_as != name else ""
    raise CheckpointError(f"checkpoint {path} does not fit model.name={name!r}{was}: "
                          + "; ".join(p for p in parts if p))


def trained_model_name(ckpt: dict[str, Any]) -> str | None:
    """The ``model.name`` a checkpoint of ours was trained with (its saved run config), if recorded."""
    config = (ckpt.get("hyper_parameters") or {}).get("config") or {}
    return (config.get("model") or {}).get("name") if isinstance(config, dict) else None


def load_run_checkpoint(model: torch.nn.Module, path: str, name: str | None = None,
                        trusted: bool = False) -> dict[str, Any]:
    """Load the CLIP weights of one of our Lightning checkpoints (keys ``model.*``) into ``model``."""
    ckpt = read_checkpoint(path, trusted)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no state_dict: not a checkpoint written by train.py")
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    check_state_dict(model, state, path, name, trained_model_name(ckpt))
    model.load_state_dict(state)
    return ckpt


def create(
    name: str,
    pretrained: str | None = None,
    aug_cfg: dict | None = None,
    trusted: bool = False,
    logit_scale: float | None = None,
    **kwargs: Any,
) -> ModelBundle:
    """Build an open_clip model with its transforms and tokenizer.

    ``pretrained`` is None (random init), an open_clip tag (downloads where a network exists), a local
    open_clip/OpenAI weights file (open_clip unwraps ``{"state_dict": ...}`` and strips ``module.``; LaCLIP's
    LAION checkpoints are such files, under open_clip names such as ``ViT-B-32``), or a ``.ckpt`` written by
    ``train.py`` (its CLIP weights are loaded). A ``LaCLIP-*`` name gets LaCLIP's preprocessing, and a file
    that is not one of our ``.ckpt`` is read in LaCLIP's own checkpoint format (``ncu.models.laclip``).
    Every file is read with ``torch.load(weights_only=True)`` unless ``trusted``: one holding other objects is
    refused (``CheckpointError``), as unpickling them can run code. ``logit_scale`` is the scale s a model
    built from scratch starts from (open_clip's ``init_logit_scale`` is its log); None keeps the architecture's.
    """
    check_model_name(name)
    ours = pretrained is not None and _is_lightning_ckpt(str(pretrained))
    if pretrained is not None and (ours or Path(str(pretrained)).suffix) and not Path(str(pretrained)).exists():
        raise FileNotFoundError(f"model.pretrained file not found: {pretrained}")
    laclip = str(name).startswith("LaCLIP-")
    if logit_scale is not None:
        kwargs = {**kwargs, "init_logit_scale": math.log(logit_scale)}
    if laclip:
        kwargs = {**LACLIP_PREPROCESS, **kwargs}
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=None if (ours or laclip) else pretrained, aug_cfg=dict(aug_cfg or {}),
            weights_only=not trusted, **kwargs
        )
    except pickle.UnpicklingError as e:
        if is_unsafe_load(e):
            raise unsafe_checkpoint_error(pretrained, e) from None
        raise
    if ours:
        load_run_checkpoint(model, str(pretrained), name, trusted)
        log.info("loaded CLIP weights from %s", pretrained)
    elif laclip and pretrained is not None:
        try:
            load_laclip(model, str(pretrained), weights_only=not trusted)
        except pickle.UnpicklingError as e:
            raise unsafe_checkpoint_error(pretrained, e) from None
        log.info("loaded LaCLIP weights from %s", pretrained)
    tokenizer = open_clip.get_tokenizer(name)
    return ModelBundle(model, preprocess_train, preprocess_val, tokenizer, name)
