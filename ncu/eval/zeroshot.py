"""Zero-shot classification: a text-prompt classifier and top-k accuracy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch import Tensor


def _as_callable(template: str | Callable[[str], str]) -> Callable[[str], str]:
    if isinstance(template, str):
        if "{}" not in template:
            raise ValueError(f"template string has no '{{}}' placeholder: {template!r}")
        return template.format
    return template


def zero_shot_classifier(
    model: torch.nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    device: str | torch.device,
    batch_size: int = 10,
) -> Tensor:
    """Class weights (d, C): per class, the renormalised mean of the L2-normalised template embeddings.

    ``templates`` may mix ``"a photo of a {}."`` strings and callables ``classname -> prompt``; strings are
    turned into callables because open_clip decides the template kind from the first entry only.
    ``batch_size`` is the number of classes encoded per forward pass.
    """
    prompts = [_as_callable(t) for t in templates]
    return build_zero_shot_classifier(
        model,
        tokenizer,
        classnames=list(classnames),
        templates=prompts,
        num_classes_per_batch=batch_size,
        device=device,
        use_tqdm=False,
    )


def zero_shot_accuracy(
    image_features: Tensor, labels: Tensor, classifier: Tensor, topk: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy in percent of ``image_features @ classifier`` (features (N, d), classifier (d, C)).

    Keys are ``top{k}``; k larger than the number of classes is capped at it (so that accuracy is 100).
    """
    if image_features.shape[1] != classifier.shape[0]:
        raise ValueError(
            f"feature dim {image_features.shape[1]} does not match classifier dim {classifier.shape[0]}"
        )
    if labels.shape != (image_features.shape[0],):
        raise ValueError(f"labels must have shape ({image_features.shape[0]},), got {tuple(labels.shape)}")
    num_classes = classifier.shape[1]
    logits = image_features.float() @ classifier.float().to(image_features.device)
    labels = labels.to(logits.device).long()
    max_k = min(max(topk), num_classes)
    top = logits.topk(max_k, dim=1).indices  # (N, max_k), best first
    hits = top == labels[:, None]
    return {
        f"top{k}": float(hits[:, : min(k, num_classes)].any(dim=1).double().mean() * 100.0) for k in topk
    }
