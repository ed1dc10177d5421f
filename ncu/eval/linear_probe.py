"""Linear probe on frozen image features (CLIP-paper recipe, with scikit-learn).

Recipe:
1. Features are the frozen image embeddings, NOT L2-normalised (as in NCU's linear-probe code).
2. They are standardised (``StandardScaler`` fitted on the training features only), so that one grid of
   ``C`` suits every backbone.
3. Classifier: multinomial logistic regression (``LogisticRegression``, L-BFGS, L2 penalty).
4. ``C`` (inverse regularisation strength), unless given, is picked from a log-spaced grid by accuracy on a
   class-stratified held-out part of the training features, like the CLIP paper's validation sweep. Ties
   go to the smaller ``C`` (stronger regularisation).
5. The classifier is refitted with that ``C`` on all training features and scored on the test features.

Everything is deterministic for a given ``seed`` (the split; L-BFGS itself is deterministic).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

DEFAULT_CS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)

ArrayLike = np.ndarray | torch.Tensor | Sequence


def _as_numpy(x: ArrayLike, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def stratified_split(labels: ArrayLike, holdout_frac: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic class-stratified split of indices into (keep, holdout), both sorted.

    Each class with at least two samples gives ``round(holdout_frac * n_c)`` samples, clipped to
    [1, n_c - 1], to the held-out part; singleton classes stay in ``keep``.
    """
    if not 0.0 < holdout_frac < 1.0:
        raise ValueError(f"holdout_frac must be in (0, 1), got {holdout_frac}")
    labels = _as_numpy(labels, np.int64)
    rng = np.random.default_rng(seed)
    holdout = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        if len(idx) < 2:
            continue
        n_out = min(max(round(holdout_frac * len(idx)), 1), len(idx) - 1)
        holdout.append(rng.permutation(idx)[:n_out])
    out = np.sort(np.concatenate(holdout)) if holdout else np.zeros(0, dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(labels)), out)
    return keep, out


def _fit(
    feats: np.ndarray, labels: np.ndarray, C: float, max_iter: int, seed: int, standardize: bool
) -> LogisticRegression | Pipeline:
    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed)
    model = make_pipeline(StandardScaler(), clf) if standardize else clf
    return model.fit(feats, labels)


def _accuracy(model: LogisticRegression | Pipeline, feats: np.ndarray, labels: np.ndarray) -> float:
    return float((model.predict(feats) == labels).mean() * 100.0)


def linear_probe(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    test_feats: ArrayLike,
    test_labels: ArrayLike,
    C: float | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    val_frac: float = 0.2,
    max_iter: int = 1000,
    seed: int = 0,
    standardize: bool = True,
) -> dict[str, float]:
    """Fit a logistic-regression probe on frozen features and report test accuracy.

    Args:
        train_feats, test_feats: (N, d) features (tensors or arrays), not normalised.
        train_labels, test_labels: (N,) integer class labels.
        C: inverse L2 strength; None sweeps ``Cs`` on a ``val_frac`` held-out split of the training set.
        max_iter: L-BFGS iterations.
        seed: seed of the held-out split and of the solver.
        standardize: standardise features with statistics of the training features.

    Returns:
        ``acc`` (test accuracy in percent), ``C`` (the value used) and ``val_acc`` (held-out accuracy in
        percent of the chosen ``C``; ``nan`` when ``C`` was given).
    """
    x_train, y_train = _as_numpy(train_feats, np.float64), _as_numpy(train_labels, np.int64)
    x_test, y_test = _as_numpy(test_feats, np.float64), _as_numpy(test_labels, np.int64)
    if x_train.ndim != 2 or x_test.ndim != 2 or x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"features must be (N, d) with equal d, got {x_train.shape} and {x_test.shape}")
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError("features and labels differ in length")
    if len(np.unique(y_train)) < 2:
        raise ValueError("the training labels hold a single class")

    val_acc = float("nan")
    if C is None:
        if not Cs:
            raise ValueError("Cs is empty")
        keep, held = stratified_split(y_train, val_frac, seed)
        if len(held) == 0 or len(np.unique(y_train[keep])) < 2:
            raise ValueError("too few training samples to hold out a validation split; pass C")
        scores = [
            _accuracy(_fit(x_train[keep], y_train[keep], c, max_iter, seed, standardize), x_train[held],
                      y_train[held])
            for c in sorted(Cs)
        ]
        best = int(np.argmax(scores))  # first maximum = smallest C among ties
        C, val_acc = sorted(Cs)[best], scores[best]

    model = _fit(x_train, y_train, C, max_iter, seed, standardize)
    return {"acc": _accuracy(model, x_test, y_test), "C": float(C), "val_acc": val_acc}
