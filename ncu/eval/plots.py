"""Diagnostic figures written straight to PNG with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _numpy(x: torch.Tensor | np.ndarray, dtype: type = np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() else x).numpy()  # numpy has no bfloat16
    return np.asarray(x, dtype=dtype)


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def score_histogram(
    scores: torch.Tensor | np.ndarray,
    is_noisy: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    title: str | None = None,
    bins: int = 50,
) -> Path:
    """Overlaid histograms of per-pair NC scores for clean and noisy pairs; returns the PNG path.

    Both groups share the bin edges, and each is normalised to a density so that groups of very
    different sizes (e.g. 10% noise) stay comparable.
    """
    values = _numpy(scores).ravel()
    noisy = _numpy(is_noisy, bool).ravel()
    if values.shape != noisy.shape:
        raise ValueError(f"scores has {values.size} entries but is_noisy has {noisy.size}")
    finite = np.isfinite(values)
    edges = np.histogram_bin_edges(values[finite], bins=bins) if finite.any() else bins
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for mask, label, color in ((~noisy, "clean", "tab:blue"), (noisy, "noisy", "tab:red")):
        group = values[mask & finite]
        if group.size:
            ax.hist(group, bins=edges, density=True, alpha=0.55, color=color,
                    label=f"{label} (n={group.size})")
    ax.set_xlabel("score (lower = more likely noisy)")
    ax.set_ylabel("density")
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def heatmap(
    matrix: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    title: str | None = None,
    xlabel: str = "target (text)",
    ylabel: str = "source (image)",
) -> Path:
    """Image of a 2-D matrix (e.g. an OT target plan) with a colour bar; returns the PNG path."""
    values = _numpy(matrix)
    if values.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D matrix, got shape {values.shape}")
    fig = Figure(figsize=(5, 4.2))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)
