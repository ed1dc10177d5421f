"""open_clip models by name: architecture registry, weights (tag, file or one of our checkpoints)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).parent / "configs"
_registered = False


def register_configs() -> None:
    """Make the small architectures shipped with ncu (``ncu-micro``, ``ncu-tiny``, ``ncu-small``) known to open_clip."""
    global _registered
    if not _registered:
        from ncu.models import laclip  # noqa: F401 - registers the qk-norm timm ViTs of the LaCLIP configs
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


def _is_lightning_ckpt(path: str) -> bool:
    return path.endswith(".ckpt")


def load_run_checkpoint(model: torch.nn.Module, path: str) -> dict[str, Any]:
    """Load the CLIP weights of one of our Lightning checkpoints (keys ``model.*``) into ``model``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {path} does not match the architecture: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    return ckpt


def create(
    name: str,
    pretrained: str | None = None,
    aug_cfg: dict | None = None,
    **kwargs: Any,
) -> ModelBundle:
    """Build an open_clip model with its transforms and tokenizer.

    ``pretrained`` is None (random init), an open_clip tag (downloads where a network exists), a local
    open_clip/OpenAI weights file, or a ``.ckpt`` written by ``train.py`` (its CLIP weights are loaded).
    """
    check_model_name(name)
    ours = pretrained is not None and _is_lightning_ckpt(str(pretrained))
    if pretrained is not None and (ours or Path(str(pretrained)).suffix) and not Path(str(pretrained)).exists():
        raise FileNotFoundError(f"model.pretrained file not found: {pretrained}")
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=None if ours else pretrained, aug_cfg=dict(aug_cfg or {}), **kwargs
    )
    if ours:
        load_run_checkpoint(model, str(pretrained))
        log.info("loaded CLIP weights from %s", pretrained)
    tokenizer = open_clip.get_tokenizer(name)
    return ModelBundle(model, preprocess_train, preprocess_val, tokenizer, name)
