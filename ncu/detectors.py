"""Dataset-level noisy-correspondence detection: per-sample scores kept across steps and epochs.

The per-batch quota (``batch``) flags floor(nc_ratio * N) pairs in every batch whatever its real noise. The
detectors here keep one score per training sample (its image->text InfoNCE probability of the own caption,
``nc_scores``) and decide over the whole split:

- ``gmm`` (NCR, Huang et al. 2021): a two-component Gaussian mixture on the per-sample losses -log(score),
  min-max normalised; a sample is flagged when the posterior of the low-loss (clean) component is below
  ``threshold``. The mixture weight of the other component is the estimated noise rate. No ``nc_ratio``.
- ``ema``: each sample's training history: an exponential moving average of its log-score over every step
  that saw it, in every stage (pre-training included; the history travels with the checkpoints and the
  pre-training cache); flagged by the mixture above at each epoch start (``cut: gmm``) or by the per-batch
  quota on the averaged scores (``cut: quota``). A mismatched pair is learned late and by memorisation, so
  its loss averaged over training stays high after the final model has fitted it.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

EPS = 1e-8


def gmm_clean_posterior(scores: np.ndarray | torch.Tensor, seed: int = 0, max_iter: int = 300,
                        tol: float = 1e-5, reg_covar: float = 5e-4) -> tuple[np.ndarray, float]:
    """``(p_clean (N,), noise_rate_estimate)`` of a two-component 1-D GaussianMixture (scikit-learn) fitted
    to the min-max normalised losses -log(score). The clean component is the one with the lower mean loss.
    Fitted to convergence: NCR's 10 iterations at tol 1e-2 stop while the noisy component is still too small
    (F1 0.72 against 0.76 converged on the noise-0.4 scenes model). Fewer than 2 distinct losses: every
    sample clean, rate 0."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    s = torch.as_tensor(scores).detach().double().cpu().numpy().reshape(-1)
    if s.size == 0:
        return np.zeros(0), 0.0
    loss = -np.log(np.clip(s, EPS, 1.0))
    span = loss.max() - loss.min()
    if s.size < 2 or span <= 0:
        return np.ones(s.size), 0.0
    x = ((loss - loss.min()) / span).reshape(-1, 1)
    gmm = GaussianMixture(n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(x)
    clean = int(np.argmin(gmm.means_.reshape(-1)))
    return gmm.predict_proba(x)[:, clean], float(1.0 - gmm.weights_[clean])


def gmm_flags(scores: np.ndarray | torch.Tensor, threshold: float = 0.5,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(flags (N,) bool, p_clean (N,) float32, rate_estimate)``: flagged where p_clean < threshold."""
    p_clean, rate = gmm_clean_posterior(scores, seed=seed)
    p = torch.from_numpy(p_clean).float()
    return p < threshold, p, rate


def ema_update(bank: torch.Tensor, index: torch.Tensor, scores: torch.Tensor, momentum: float) -> torch.Tensor:
    """``bank[index] = momentum * bank[index] + (1 - momentum) * scores`` where the bank holds a value, else the
    score itself (a sample's first visit); in place, returns the updated entries. A sample seen twice in one
    call (padded DDP batches) takes the last of its scores."""
    if not 0.0 <= momentum < 1.0 or math.isnan(momentum):
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    index = index.to(bank.device).long()
    scores = scores.detach().to(bank.device, bank.dtype)
    old = bank[index]
    new = torch.where(torch.isnan(old), scores, momentum * old + (1.0 - momentum) * scores)
    bank[index] = new
    return bank[index]
