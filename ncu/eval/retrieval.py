"""Image-text retrieval metrics (R@K, rSum, median and mean rank).

Conventions:
- Scores are cosine similarities of L2-normalised features, computed in float32.
- A rank is 0-based. Ties are broken at random, in expectation: with ``g`` candidates scored above the ground
  truth and ``e`` others scored equal to it, R@K counts the query as ``clip((K - g) / (e + 1), 0, 1)`` (the
  chance that a random order of the tied block puts the truth in the top K) and the rank is the mid-rank
  ``g + e / 2``. A constant model therefore scores at chance (R@K = K / candidates), never at 100; NaN scores
  rank last (as -inf). Without ties this is the plain strict rank.
- image->text uses, per image, the best (smallest) rank among its ground-truth captions; text->image uses
  the rank of the paired image.
- The similarity matrix is never built whole: rows are processed ``chunk_size`` at a time in each direction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _check_inputs(image_features: Tensor, text_features: Tensor, text_to_image: Tensor) -> None:
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError("image_features and text_features must be 2-D (N, d)")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"feature dims differ: images {image_features.shape[1]}, texts {text_features.shape[1]}"
        )
    if text_to_image.shape != (text_features.shape[0],):
        raise ValueError(
            f"text_to_image must have shape ({text_features.shape[0]},), got {tuple(text_to_image.shape)}"
        )
    num_images = image_features.shape[0]
    if text_to_image.numel() and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise ValueError(f"text_to_image holds indices outside [0, {num_images})")
    captions_per_image = torch.bincount(text_to_image.cpu(), minlength=num_images)
    missing = int((captions_per_image == 0).sum())
    if missing:
        raise ValueError(f"{missing} of {num_images} images have no caption; drop them before evaluating")


Ranks = tuple[Tensor, Tensor]  # per query: candidates scored above the truth, others tied with it


def _similarities(queries: Tensor, candidates: Tensor) -> Tensor:
    # NaN as -inf: a NaN score is below every number and ties only with other NaN scores.
    return torch.nan_to_num(queries @ candidates.T, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def _cat(parts: list[Tensor], device: torch.device) -> Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def t2i_ranks(
    image_features: Tensor, text_features: Tensor, text_to_image: Tensor, chunk_size: int = 1024
) -> Ranks:
    """For each caption, how many images score above its paired image and how many others tie with it,
    chunked over captions. Two tensors of shape (T,)."""
    images = image_features.float()
    texts = text_features.float()
    targets = text_to_image.to(images.device).long()
    above, tied = [], []
    for start in range(0, texts.shape[0], chunk_size):
        sims = _similarities(texts[start : start + chunk_size], images)  # (c, M)
        gt = sims.gather(1, targets[start : start + chunk_size, None])  # (c, 1)
        above.append((sims > gt).sum(dim=1))
        tied.append((sims == gt).sum(dim=1) - 1)  # the paired image itself is not a tie
    return _cat(above, images.device), _cat(tied, images.device)


def i2t_ranks(
    image_features: Tensor, text_features: Tensor, text_to_image: Tensor, chunk_size: int = 1024
) -> Ranks:
    """For each image, how many captions score above its best-scored ground-truth caption and how many other
    images' captions tie with it, chunked over images. Two tensors of shape (M,)."""
    images = image_features.float()
    texts = text_features.float()
    targets = text_to_image.to(images.device).long()
    above, tied = [], []
    for start in range(0, images.shape[0], chunk_size):
        sims = _similarities(images[start : start + chunk_size], texts)  # (c, T)
        image_ids = torch.arange(start, start + sims.shape[0], device=images.device)
        is_gt = targets[None, :] == image_ids[:, None]  # (c, T)
        # The best rank among the ground truths is the rank of the highest-scoring ground truth; ground truths
        # tied with it are the same answer, not competitors.
        best_gt = sims.masked_fill(~is_gt, float("-inf")).max(dim=1, keepdim=True).values
        above.append((sims > best_gt).sum(dim=1))
        tied.append(((sims == best_gt) & ~is_gt).sum(dim=1))
    return _cat(above, images.device), _cat(tied, images.device)


def _summarise(ranks: Ranks, ks: Sequence[int], prefix: str) -> dict[str, float]:
    """Recalls in percent (ties in expectation), 1-based median rank (floor of the median mid-rank, the usual
    convention) and mean rank."""
    above, tied = (r.double() for r in ranks)
    out = {f"{prefix}_R@{k}": float(((k - above) / (tied + 1)).clamp(0, 1).mean() * 100.0) for k in ks}
    ranks = above + tied / 2  # the mid-rank: the mean of the ranks a random tie-break gives
    # Median of the 0-based ranks, averaging the two middles for an even count, floored, then made 1-based.
    median = float(torch.quantile(ranks, 0.5))
    out[f"{prefix}_medr"] = float(int(median) + 1)
    out[f"{prefix}_meanr"] = float((ranks + 1).mean())
    return out


def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Bidirectional retrieval metrics.

    Args:
        image_features: (M, d) L2-normalised image embeddings.
        text_features: (T, d) L2-normalised caption embeddings.
        text_to_image: (T,) long, the image index of each caption (several captions per image allowed).
        ks: the K of R@K.
        chunk_size: rows of the similarity matrix computed at once.

    Returns:
        ``i2t_R@K`` and ``t2i_R@K`` in percent, ``rsum`` (sum of all those recalls), ``i2t_medr``,
        ``t2i_medr`` (1-based median rank), ``i2t_meanr``, ``t2i_meanr`` (1-based mean rank).

    Raises:
        ValueError: on inconsistent shapes, out-of-range indices, or images that have no caption.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    if image_features.shape[0] == 0 or text_features.shape[0] == 0:
        raise ValueError("need at least one image and one caption")
    _check_inputs(image_features, text_features, text_to_image)
    with torch.no_grad():
        i2t = i2t_ranks(image_features, text_features, text_to_image, chunk_size)
        t2i = t2i_ranks(image_features, text_features, text_to_image, chunk_size)
    out = {**_summarise(i2t, ks, "i2t"), **_summarise(t2i, ks, "t2i")}
    ordered = {f"i2t_R@{k}": out[f"i2t_R@{k}"] for k in ks}
    ordered |= {f"t2i_R@{k}": out[f"t2i_R@{k}"] for k in ks}
    ordered["rsum"] = sum(ordered.values())
    for key in ("i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr"):
        ordered[key] = out[key]
    return ordered
