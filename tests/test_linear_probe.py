"""Linear probe: separable data is learned, random labels are not, results are deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncu.eval.linear_probe import linear_probe, stratified_split


def centres(num_classes: int, dim: int, seed: int = 100) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(num_classes, dim)) * 4.0


def blobs(n_per_class: int, means: np.ndarray, spread: float, seed: int):
    """Gaussian blobs around ``means``, with a large shared offset and scale (un-normalised features)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(means)), n_per_class)
    feats = means[labels] + spread * rng.normal(size=(len(labels), means.shape[1]))
    return 50.0 + 10.0 * feats, labels


def test_separable_blobs_are_learned():
    means = centres(4, 16)
    x, y = blobs(60, means, 1.0, seed=0)
    xt, yt = blobs(40, means, 1.0, seed=1)
    out = linear_probe(torch.tensor(x), torch.tensor(y), xt, yt)
    assert out["acc"] >= 95.0
    assert out["val_acc"] >= 95.0
    assert out["C"] in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def test_random_labels_give_chance_accuracy():
    rng = np.random.default_rng(0)
    x, xt = rng.normal(size=(400, 8)), rng.normal(size=(1000, 8))
    y, yt = rng.integers(0, 4, 400), rng.integers(0, 4, 1000)
    out = linear_probe(x, y, xt, yt)
    # Chance is 25%; 1000 test samples put the binomial standard deviation at ~1.4 points.
    assert 18.0 <= out["acc"] <= 32.0


def test_deterministic_and_fixed_C():
    means = centres(3, 8)
    x, y = blobs(30, means, 8.0, seed=2)  # overlapping classes
    xt, yt = blobs(30, means, 8.0, seed=3)
    assert linear_probe(x, y, xt, yt, seed=5) == linear_probe(x, y, xt, yt, seed=5)
    fixed = linear_probe(x, y, xt, yt, C=0.5)
    assert fixed["C"] == 0.5 and np.isnan(fixed["val_acc"])


def test_stratified_split_counts_and_determinism():
    labels = np.array([0] * 10 + [1] * 5 + [2])
    keep, held = stratified_split(labels, 0.2, seed=0)
    assert sorted(np.concatenate([keep, held]).tolist()) == list(range(16))
    assert np.bincount(labels[held], minlength=3).tolist() == [2, 1, 0]
    k2, h2 = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(held, h2) and np.array_equal(keep, k2)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        linear_probe(np.zeros((4, 2)), [0, 1, 0, 1], np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError):
        linear_probe(np.zeros((4, 2)), [0, 0, 0, 0], np.zeros((2, 2)), [0, 1])
