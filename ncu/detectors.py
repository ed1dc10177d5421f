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

Each is a ``Detector`` (``REGISTRY``, ``build``): ``flag`` a batch, ``refresh`` at an epoch start; the
per-sample ones read and write a ``SampleMemory``, whose history checkpoints carry.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

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


# ----- the family: one interface for every detector (``method.detector``, or a stage's own) ----------------------
class SampleMemory:
    """What the per-sample detectors keep about each training pair, across steps, epochs and stages: its last
    score (``scores``, gmm's input), its log-score averaged over every step of every stage (``history``, ema's
    input; carried by checkpoints and the pre-training cache), and the last mixture fit (``flags``,
    ``p_clean``, ``rate_est``). ``num_train`` is the training split's size (0: unknown, nothing is kept)."""

    def __init__(self, num_train: int = 0) -> None:
        self.num_train = num_train
        self.scores: torch.Tensor | None = None
        self.history: torch.Tensor | None = None
        self.flags: torch.Tensor | None = None
        self.p_clean: torch.Tensor | None = None
        self.rate_est = float("nan")

    def bank(self, device: torch.device) -> torch.Tensor:
        if self.scores is None:
            if self.num_train < 1:
                raise ValueError("per-sample detection needs num_train (the training split's size)")
            self.scores = torch.full((self.num_train,), float("nan"), device=device)
        return self.scores

    def observe(self, index: torch.Tensor | None, scores: torch.Tensor, momentum: float,
                device: torch.device) -> None:
        """Fold a (global) batch's scores into each sample's history, in log space (a mean of losses). A batch
        without sample indices (or with an unknown one, -1) is not recorded."""
        if index is None or self.num_train < 1 or bool((index < 0).any()):
            return
        if self.history is None:
            self.history = torch.full((self.num_train,), float("nan"), device=device)
        ema_update(self.history, index, scores.detach().float().clamp_min(EPS).log(), momentum)

    def restore(self, checkpoint: dict, device: torch.device) -> bool:
        """The history a checkpoint carries (False when it has none, or one of another split)."""
        history = checkpoint.get("ncu_sample_history")
        if history is None or (self.num_train and history.numel() != self.num_train):
            return False
        self.history = history.to(device).float().clone()
        return True

    def take_pass(self, passed: torch.Tensor | None) -> bool:
        """A scoring pass's scores into the bank where it has one (False when the source gave none)."""
        if passed is None:
            return False
        self.scores.copy_(torch.where(torch.isnan(passed), self.scores, passed))
        return True

    def fit(self, threshold: float, seed: int) -> None:
        """The two-component mixture on the known scores: flags, p_clean and the estimated rate. Samples
        without a score are not flagged."""
        bank = self.scores
        known = ~torch.isnan(bank)
        flags, p_clean = torch.zeros_like(known), torch.ones_like(bank)
        if int(known.sum()) >= 2:
            f, p, self.rate_est = gmm_flags(bank[known], threshold, seed)
            flags[known], p_clean[known] = f.to(bank.device), p.to(bank.device)
        self.flags, self.p_clean = flags, p_clean


class Detector:
    """Flags a (global) batch: ``flag`` returns ``(flagged, detection scores)``, the scores (higher = cleaner)
    the detection metrics rank. ``refresh`` runs at each epoch start of a stage that acts on flags, with a
    ``scoring_pass()`` that returns every training sample's score (or None where the source has none)."""

    name = ""
    per_sample = False  # keeps a SampleMemory and needs every pair's sample index

    def flag(self, scores: torch.Tensor, noisy: torch.Tensor, index: torch.Tensor | None, memory: SampleMemory,
             quota: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def refresh(self, memory: SampleMemory, scoring_pass: Any, seed: int, device: torch.device) -> None:
        """Nothing to do at an epoch start (the per-batch detectors)."""


class BatchQuota(Detector):
    """The paper's rule: the k = floor(nc_ratio * N) lowest scores of every batch, whatever its real noise."""

    name = "batch"

    def flag(self, scores, noisy, index, memory, quota):
        return quota(scores), scores


class Oracle(Detector):
    """The ground truth every sample carries: an upper bound that separates identification from unlearning."""

    name = "oracle"

    def flag(self, scores, noisy, index, memory, quota):
        return noisy.to(dtype=torch.bool, device=scores.device).clone(), scores


class Mixture(Detector):
    """``gmm``: each sample's last score (from the previous epochs' steps, or a scoring pass at every epoch
    start with ``source: pass``), cut by the two-component mixture at ``threshold``; ranked by p_clean."""

    name, per_sample = "gmm", True

    def __init__(self, threshold: float, source: str, **_: Any) -> None:
        self.threshold, self.source = threshold, source

    def flag(self, scores, noisy, index, memory, quota):
        latest = ema_update(memory.bank(scores.device), index, scores, 0.0).to(scores.device)
        if memory.flags is None:  # no mixture fitted yet (a module driven without a Trainer): the quota
            return quota(latest), latest
        index = index.to(memory.flags.device).long()
        return memory.flags[index].to(scores.device), memory.p_clean[index].to(scores.device)

    def refresh(self, memory, scoring_pass, seed, device):
        bank = memory.bank(device)
        if self.source == "pass" or bool(torch.isnan(bank).all()):
            memory.take_pass(scoring_pass())
        memory.fit(self.threshold, seed)


class History(Detector):
    """``ema``: each sample's log-score averaged over every step of every stage (the step folds the batch in
    first), cut by the mixture at each epoch start (``cut: gmm``) or by the per-batch quota (``cut: quota``)."""

    name, per_sample = "ema", True

    def __init__(self, threshold: float, cut: str, momentum: float, **_: Any) -> None:
        self.threshold, self.cut, self.momentum = threshold, cut, momentum

    def flag(self, scores, noisy, index, memory, quota):
        if memory.history is None:  # driven without a training step (which folds the batch in first)
            memory.bank(scores.device)  # (names a missing num_train)
            memory.observe(index, scores, self.momentum, scores.device)
        averaged = memory.history[index.to(memory.history.device).long()].exp().to(scores.device)
        if self.cut == "quota" or memory.flags is None:
            return quota(averaged), averaged
        return memory.flags[index.to(memory.flags.device).long()].to(scores.device), averaged

    def refresh(self, memory, scoring_pass, seed, device):
        if self.cut != "gmm":
            return
        bank = memory.bank(device)
        if memory.history is not None:
            bank.copy_(memory.history.exp())
        if bool(torch.isnan(bank).all()):
            passed = scoring_pass()
            if memory.take_pass(passed):
                # no history yet (a model given by model.pretrained): it starts here; NaN stays NaN
                memory.history = passed.clamp_min(EPS).log().to(bank.device)
        memory.fit(self.threshold, seed)


REGISTRY: dict[str, type[Detector]] = {d.name: d for d in (BatchQuota, Oracle, Mixture, History)}


def build(name: str, detection: dict) -> Detector:
    """The detector ``name`` with its ``detection`` settings (the method's, a stage's own over them)."""
    if name not in REGISTRY:
        raise ValueError(f"method.detector={name!r} is unknown; choose from {tuple(REGISTRY)}")
    cls = REGISTRY[name]
    return cls(**detection) if cls.per_sample else cls()
