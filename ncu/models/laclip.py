"""Import LaCLIP-released CLIP checkpoints (the models NCU starts from) into open_clip models.

LaCLIP's ``CLIP_VITB16`` is:
- vision: a timm ViT-B/16 with QK-LayerNorm (``qk_norm=True``), no classifier, cls-token pooling after the
  final norm (keys ``visual.*``), then a separate ``image_projection`` parameter of shape (768, 512) applied
  as ``x @ image_projection``;
- text: the OpenAI-style transformer (width 512, 12 layers, 8 heads, QuickGELU, causal mask, context 77,
  vocabulary 49408) with ``token_embedding``, ``positional_embedding``, ``transformer.resblocks.*``,
  ``ln_final`` and ``text_projection`` (512, 512), plus ``logit_scale``.

The open_clip equivalent is ``LaCLIP-ViT-B-16`` (``ncu/models/configs/LaCLIP-ViT-B-16.json``): open_clip's timm vision tower around a timm ViT registered here with ``qk_norm=True``
(``laclip_vit_base_patch16_224``), ``timm_pool: token`` and a bias-free linear head, whose weight is
``image_projection`` transposed. Text keys are identical in both models. Importing this module registers
the timm models and the configs; both are needed before ``open_clip.create_model("LaCLIP-ViT-B-16")``.

LaCLIP's other checkpoints (LAION-400M ViT-B/32, B/16, L/14) are open_clip models saved as ``{"state_dict": ...}``:
load them under open_clip's names (``model.name=ViT-B-32 model.pretrained=laion400m_clip.pt``), not here.

Sanity check for a correct import: LaCLIP's README reports ~15.8% ImageNet zero-shot top-1 for its CC3M CLIP
ViT-B/16 checkpoint (``vitb16_cc3m_clip.pt``) and 40.2% for CC12M, with the 7 templates of its
``eval_zeroshot_imagenet.py`` (``templates: laclip`` in a zero-shot task).

Usage::

    from ncu.models.factory import create
    bundle = create("LaCLIP-ViT-B-16", "cc3m_clip.pt")  # LaCLIP's preprocessing and this importer
"""

from __future__ import annotations

import argparse
import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import register_model
from torch import Tensor

import open_clip

# The JSON configs shipped with ncu (the LaCLIP ones are written by write_configs).
CONFIG_DIR = Path(__file__).parent / "configs"

__all__ = [
    "LACLIP_MODELS",
    "LACLIP_PREPROCESS",
    "CheckpointKeyError",
    "laclip_config",
    "laclip_key",
    "laclip_key_map",
    "load_laclip",
    "register_qknorm_vit",
    "strip_module_prefix",
    "write_configs",
]  # timm appends the names of the ViTs registered here

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# LaCLIP's eval transform: resize the short side (bilinear), centre crop, ImageNet mean/std. These are
# keyword arguments of open_clip.create_model_and_transforms (and of ncu.models.factory.create).
LACLIP_PREPROCESS: dict[str, Any] = {
    "image_mean": IMAGENET_MEAN,
    "image_std": IMAGENET_STD,
    "image_interpolation": "bilinear",
    "image_resize_mode": "shortest",
}

# open_clip name -> timm name of its vision trunk; the timm names are registered below.
LACLIP_MODELS: dict[str, str] = {
    "LaCLIP-ViT-B-16": "laclip_vit_base_patch16_224",
}


def register_qknorm_vit(name: str, base: str, **overrides: Any) -> None:
    """Register the timm model ``name``: timm's ``base`` ViT with ``qk_norm=True`` and ``overrides``.

    This lets a config use other sizes of LaCLIP's vision trunk (e.g. a small one for tests); the
    overrides are timm ``VisionTransformer`` arguments (``depth``, ``embed_dim``, ``img_size``, ...).
    """

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        return timm.create_model(base, pretrained=pretrained, qk_norm=True, **(overrides | kwargs))

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    globals()[name] = entrypoint  # timm lists registered names in this module's __all__
    register_model(entrypoint)


# LaCLIP's vision trunk: a ViT-B/16 with QK-LayerNorm.
for _timm_name in LACLIP_MODELS.values():
    register_qknorm_vit(_timm_name, _timm_name.removeprefix("laclip_"))


def laclip_config(
    timm_model_name: str = "laclip_vit_base_patch16_224",
    embed_dim: int = 512,
    image_size: int = 224,
    context_length: int = 77,
    vocab_size: int = 49408,
    text_width: int = 512,
    text_heads: int = 8,
    text_layers: int = 12,
) -> dict[str, Any]:
    """open_clip model config of a LaCLIP CLIP (defaults: ``CLIP_VITB16``).

    open_clip takes no preprocessing from a built-in config, so :data:`LACLIP_PREPROCESS` is passed to
    ``create_model_and_transforms`` separately.
    """
    return {
        "embed_dim": embed_dim,
        "quick_gelu": True,  # LaCLIP's text blocks use QuickGELU; timm towers keep their own GELU.
        "vision_cfg": {
            "image_size": image_size,
            "timm_model_name": timm_model_name,
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": "linear",
            "timm_proj_bias": False,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": vocab_size,
            "width": text_width,
            "heads": text_heads,
            "layers": text_layers,
        },
    }


def write_configs(directory: str | Path = CONFIG_DIR) -> list[Path]:
    """Write the JSON configs of :data:`LACLIP_MODELS` into ``directory``; returns their paths."""
    paths = []
    for name, timm_name in LACLIP_MODELS.items():
        path = Path(directory) / f"{name}.json"
        path.write_text(json.dumps(laclip_config(timm_name), indent=4) + "\n")
        paths.append(path)
    return paths


def strip_module_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` prefix that DistributedDataParallel puts on every key."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def laclip_key(key: str) -> str:
    """open_clip name of one LaCLIP key (without ``module.``); see :func:`laclip_key_map`."""
    if key.startswith("visual."):
        return "visual.trunk." + key.removeprefix("visual.")
    if key == "image_projection":
        return "visual.head.proj.weight"
    return key


def laclip_key_map(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename (and reshape where needed) LaCLIP CLIP keys to those of the open_clip ``LaCLIP-*`` model.

    - ``module.`` prefixes are removed;
    - ``visual.<k>`` -> ``visual.trunk.<k>`` (the timm ViT sits in open_clip's ``TimmModel.trunk``);
    - ``image_projection`` (vision_width, embed_dim), used as ``x @ P``, -> ``visual.head.proj.weight``
      = ``P.T`` of shape (embed_dim, vision_width), since ``nn.Linear`` computes ``x @ W.T``;
    - every other key (text tower, ``logit_scale``) is unchanged.
    """
    out: dict[str, Tensor] = {}
    for key, value in strip_module_prefix(state_dict).items():
        out[laclip_key(key)] = value.t().contiguous() if key == "image_projection" else value
    return out


class CheckpointKeyError(KeyError):
    """Checkpoint keys do not match the model's; the message lists them."""

    def __str__(self) -> str:  # KeyError would show the repr of the (multi-line) message
        return str(self.args[0])


def _read_checkpoint(path: str | Path, weights_only: bool) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LaCLIP checkpoint not found: {path}")
    try:
        # LaCLIP checkpoints also hold the training argparse.Namespace.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(
            f"{path} holds objects that weights_only loading refuses; if you trust the file, "
            f"call load_laclip(..., weights_only=False). Original error: {err}"
        ) from err


def _unwrap(obj: Any) -> Mapping[str, Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError("expected a state dict (name -> tensor), possibly wrapped as {'state_dict': ...}")
    return obj


def _list(keys: Sequence[str], limit: int = 30) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_laclip(
    model: torch.nn.Module,
    path_or_state_dict: str | Path | Mapping[str, Any],
    strict: bool = True,
    ignore: Sequence[str] = (),
    weights_only: bool = True,
) -> dict[str, list[str]]:
    """Load a LaCLIP CLIP checkpoint into an open_clip ``LaCLIP-*`` model, checking every key.

    Args:
        model: e.g. ``open_clip.create_model("LaCLIP-ViT-B-16")``.
        path_or_state_dict: a file saved with ``torch.save`` or a state dict; either may be wrapped as
            ``{"state_dict": ...}`` and carry ``module.`` prefixes.
        strict: raise :class:`CheckpointKeyError` if any key is missing from the checkpoint or unexpected
            by the model; with ``strict=False`` the common keys are loaded and the lists returned.
        ignore: checkpoint keys (LaCLIP names, after ``module.`` removal) or key prefixes to drop first,
            e.g. ``("prompt_ctx",)`` for checkpoints written by the NCU training code.
        weights_only: passed to ``torch.load``; ``False`` only for trusted files.

    Returns:
        ``{"missing": [...], "unexpected": [...]}``: model keys absent from the checkpoint and checkpoint
        keys (LaCLIP names) the model lacks; both empty when ``strict``.

    Raises:
        CheckpointKeyError: (a ``KeyError``) unmatched keys on either side, when ``strict``.
        ValueError: a tensor whose shape differs from the model's (always).
    """
    raw = path_or_state_dict
    if isinstance(raw, (str, Path)):
        raw = _read_checkpoint(raw, weights_only)
    source = strip_module_prefix(_unwrap(raw))
    source = {k: v for k, v in source.items() if not any(k == p or k.startswith(p) for p in ignore)}
    mapped = laclip_key_map(source)
    target = model.state_dict()

    missing = sorted(set(target) - set(mapped))
    unexpected = sorted(k for k in source if laclip_key(k) not in target)
    mismatched = [
        f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sorted(set(mapped) & set(target))
        if mapped[k].shape != target[k].shape
    ]
    if mismatched:
        raise ValueError("shape mismatch between checkpoint and model:\n  " + "\n  ".join(mismatched))
    if strict and (missing or unexpected):
        lines = ["checkpoint keys do not match the model:"]
        if missing:
            lines.append(f"missing in checkpoint ({len(missing)}, model names): {_list(missing)}")
        if unexpected:
            lines.append(
                f"unexpected in checkpoint ({len(unexpected)}, checkpoint names): {_list(unexpected)}"
            )
        if any(k.startswith(("visual.transformer.", "visual.conv1.")) for k in unexpected):
            lines.append("these are open_clip keys (LaCLIP's LAION checkpoints are open_clip models): use the "
                         "open_clip name, e.g. model.name=ViT-B-32, with the same model.pretrained")
        raise CheckpointKeyError("\n  ".join(lines))
    model.load_state_dict({k: v for k, v in mapped.items() if k in target}, strict=strict)
    return {"missing": missing, "unexpected": unexpected}


open_clip.add_model_config(CONFIG_DIR)  # makes the LaCLIP-* JSON configs known to open_clip on import
