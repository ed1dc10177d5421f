"""NCU losses as pure functions (noisy-correspondence detection, stage 1, OT targets, stage 2).

Inputs are L2-normalised features: images ``v`` (N, d), captions ``t`` (N, d) and the hardest-negative
("negated") captions ``tn`` (N, d), row i belonging to pair i. ``s`` is the inverse temperature
``s = exp(logit_scale)``, i.e. the already exponentiated scale (about 100), given as a 0-d tensor
(it may carry a gradient to ``logit_scale``) or a float. Clamping it is the caller's job.

All losses are computed in float32 with autocast disabled; gradients flow to ``v``, ``t``, ``tn``
and ``s`` but never through the OT targets.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ncu.choices import FLAGGED_CAPTIONS, HN_CAPACITIES

Solver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

__all__ = [
    "nc_scores",
    "select_nc",
    "band_loss",
    "stage1_loss",
    "build_mask",
    "hard_labels",
    "ot_targets",
    "stage2_loss",
]


def _scale(s: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """The inverse temperature as a float32 0-d tensor on ``device`` (keeps its autograd graph)."""
    if isinstance(s, torch.Tensor):
        if s.numel() != 1:
            raise ValueError(f"logit scale s must be a scalar, got shape {tuple(s.shape)}")
        return s.reshape(()).to(device=device, dtype=torch.float32)
    return torch.tensor(float(s), device=device, dtype=torch.float32)


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=x.device.type, enabled=False)


def _rownorm(p: torch.Tensor) -> torch.Tensor:
    """Rows divided by their sums; rows summing to 0 stay 0."""
    sums = p.sum(dim=1, keepdim=True)
    return torch.where(sums > 0, p / sums.clamp_min(torch.finfo(p.dtype).tiny), torch.zeros_like(p))


def nc_scores(v: torch.Tensor, t: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """Image-to-text InfoNCE probability of each pair's own caption, (N,) float32, no grad.

    pi_i = softmax_j(s * v_i . t_j)[i]. Low pi marks a likely noisy (mismatched) pair.
    """
    if v.shape != t.shape or v.dim() != 2:
        raise ValueError(f"v and t must both be (N, d), got {tuple(v.shape)} and {tuple(t.shape)}")
    with torch.no_grad(), _no_autocast(v):
        logits = _scale(s, v.device).detach() * (v.float() @ t.float().T)
        return torch.log_softmax(logits, dim=1).diagonal().exp()


def nc_count(ratio: float, n: int, rule: str = "floor") -> int:
    """k, the pairs flagged in a batch of ``n``: ``floor`` is floor(ratio * n) with a 1e-9 slack that keeps
    e.g. 0.29 * 100 at 29 despite float rounding; ``truncate`` is the official code's int(ratio * n) (28)."""
    if rule == "floor":
        return min(int(math.floor(ratio * n + 1e-9)), n)
    if rule == "truncate":
        return min(int(ratio * n), n)
    raise ValueError(f"nc_count rule {rule!r} is unknown; choose floor or truncate")


def select_nc(scores: torch.Tensor, ratio: float, count: str = "floor") -> torch.Tensor:
    """Bool mask (N,), True for the k = :func:`nc_count` (ratio, N, count) lowest scores (ties: lower index
    first)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    n = scores.numel()
    k = nc_count(ratio, n, count)
    order = torch.sort(scores.detach().float(), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    mask[order[:k]] = True
    return mask


def band_loss(
    t: torch.Tensor, tn: torch.Tensor, low: float = -0.7, high: float = -0.2
) -> torch.Tensor:
    """mean_i relu(t_i . tn_i - high) + relu(low - t_i . tn_i): keeps cos(t_i, tn_i) in [low, high]."""
    if t.shape != tn.shape:
        raise ValueError(f"t and tn shapes differ: {tuple(t.shape)} vs {tuple(tn.shape)}")
    with _no_autocast(t):
        c = (t.float() * tn.float()).sum(dim=-1)
        return (F.relu(c - high) + F.relu(low - c)).mean()


def stage1_loss(
    v: torch.Tensor,
    t: torch.Tensor,
    tn: torch.Tensor,
    s: torch.Tensor | float,
    clean: torch.Tensor,
    w_cyc: float = 10.0,
    w_band: float = 10.0,
    w_sig_pos: float = 1.0,
    w_sig_neg: float = 1.0,
    band: tuple[float, float] = (-0.7, -0.2),
    detach_t: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hardest-negative learning loss on the clean pairs (rows where ``clean`` is True), n of them.

    - cyc     = (1/n) sum_ij (t_i.t_j - tn_i.tn_j)^2
    - band    = band_loss(t, tn)
    - sig_pos = -(1/n) sum_ij log sigmoid(y_ij * s * v_i.t_j),   y = 2I - 1
    - sig_neg = -(1/n) sum_ij log sigmoid(-y_ij * s * v_i.tn_j)

    Returns ``(w_cyc*cyc + w_band*band + w_sig_pos*sig_pos + w_sig_neg*sig_neg, parts)``; ``parts``
    holds the four unweighted terms, detached. ``detach_t``: the captions are constants in cyc and band
    (stop-gradient), so those terms move only the negated path, never the caption features.
    """
    if not (v.shape == t.shape == tn.shape) or v.dim() != 2:
        raise ValueError(
            f"v, t, tn must all be (N, d), got {tuple(v.shape)}, {tuple(t.shape)}, {tuple(tn.shape)}"
        )
    clean = clean.to(device=v.device, dtype=torch.bool)
    if clean.shape != (v.shape[0],):
        raise ValueError(f"clean must be ({v.shape[0]},), got {tuple(clean.shape)}")
    n = int(clean.sum())
    if n == 0:
        raise ValueError("stage1_loss needs at least one clean pair")
    with _no_autocast(v):
        vc, tc, tnc = v[clean].float(), t[clean].float(), tn[clean].float()
        scale = _scale(s, v.device)
        y = 2.0 * torch.eye(n, device=v.device) - 1.0
        ta = tc.detach() if detach_t else tc
        cyc = ((ta @ ta.T - tnc @ tnc.T) ** 2).sum() / n
        band_term = band_loss(ta, tnc, *band)
        sig_pos = -F.logsigmoid(y * scale * (vc @ tc.T)).sum() / n
        sig_neg = -F.logsigmoid(-y * scale * (vc @ tnc.T)).sum() / n
        loss = w_cyc * cyc + w_band * band_term + w_sig_pos * sig_pos + w_sig_neg * sig_neg
    parts = {
        "cyc": cyc.detach(),
        "band": band_term.detach(),
        "sig_pos": sig_pos.detach(),
        "sig_neg": sig_neg.detach(),
    }
    return loss, parts


def build_mask(nc: torch.Tensor, use_hn: bool = True) -> torch.Tensor:
    """Allowed-transport table, bool (N, N+1) with the hardest-negative column, else (N, N).

    Clean row i: every caption allowed, HN column forbidden. NC row i: every caption except its own,
    plus the HN column. Without HN, NC rows simply lose their own caption.
    """
    nc = nc.to(dtype=torch.bool)
    n = nc.numel()
    mask = torch.ones(n, n + 1 if use_hn else n, dtype=torch.bool, device=nc.device)
    idx = torch.arange(n, device=nc.device)
    mask[idx, idx] = ~nc
    if use_hn:
        mask[:, n] = nc
    return mask


def hard_labels(nc: torch.Tensor, use_hn: bool = True) -> torch.Tensor:
    """One-hot image-to-text hard labels, float32 (N, N+1) with HN column, else (N, N).

    Clean row i: its own caption. NC row i: the HN column. Without HN there is no column that stands
    for "not this caption", so an NC row's label is uniform over the N-1 other captions: it keeps the
    row a distribution, puts no mass on the mismatched caption and favours no particular other one.
    """
    nc = nc.to(dtype=torch.bool)
    n = nc.numel()
    idx = torch.arange(n, device=nc.device)
    clean = (~nc).float()
    if use_hn:
        labels = torch.zeros(n, n + 1, device=nc.device)
        labels[idx, idx] = clean
        labels[:, n] = nc.float()
        return labels
    if n < 2 and bool(nc.any()):
        raise ValueError("without the HN column an NC row needs at least one other caption (N >= 2)")
    labels = torch.zeros(n, n, device=nc.device)
    labels[nc] = 1.0 / max(n - 1, 1)
    labels[idx, idx] = clean
    return labels




def ot_targets(
    A: torch.Tensor,
    nc: torch.Tensor,
    gamma: float,
    solver: Solver,
    use_hn: bool = True,
    normalize_t2v: bool = True,
    reuse_transpose: bool = True,
    flagged_captions: str = "target",
    hn_capacity: str = "uniform",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft targets (Yv, Yt) from entropic OT on the extended similarity A, float32, no grad.

    A = [S | h] (N, N+1), or S (N, N) without HN. Cost C = (1 - A) / max(1 - A); row marginal 1/N;
    support mask from :func:`build_mask`.

    Yv = gamma * rownorm(Pv) + (1 - gamma) * Lv    rows: images (N)
    Yt = gamma * rownorm(Pt) + (1 - gamma) * Lv^T  rows: captions (+ the HN row), columns: images

    Columns of the transport problem and their marginals:

    - ``flagged_captions="target"`` (official): every caption is a column. ``"negative"`` / ``"drop"``: the
      flagged (NC) captions take no mass, so no image is moved towards a caption judged mismatched (their
      Yt rows are 0; whether they stay in the softmax is :func:`stage2_loss`'s business). Without HN an NC
      row's hard label then spreads over the unflagged captions only.
    - ``hn_capacity="uniform"`` (official): each column gets 1 / (number of columns), the HN column
      included, so it can absorb only 1/(N+1) of the k/N mass the NC rows hold. ``"flagged"``: the HN
      column's capacity is the NC rows' mass k/N and the caption columns share the rest equally.

    Pt = Pv^T when ``reuse_transpose`` (the transposed problem has the same solution), else a second
    solve on (C^T, b, a, mask^T). With ``normalize_t2v`` the Yt rows with positive sum are rescaled to
    sum to 1; otherwise they keep their raw sums (clean captions 1, NC captions gamma, HN row
    gamma + (1 - gamma) k). ``gamma == 0`` skips the solver (hard labels only).

    If no row is NC the HN column cannot receive mass; the problem is then solved without it.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if flagged_captions not in FLAGGED_CAPTIONS:
        raise ValueError(f"flagged_captions={flagged_captions!r}; choose from {FLAGGED_CAPTIONS}")
    if hn_capacity not in HN_CAPACITIES:
        raise ValueError(f"hn_capacity={hn_capacity!r}; choose from {HN_CAPACITIES}")
    nc = nc.to(device=A.device, dtype=torch.bool)
    n = nc.numel()
    n_cols = n + 1 if use_hn else n
    if A.shape != (n, n_cols):
        raise ValueError(f"A must have shape ({n}, {n_cols}) for use_hn={use_hn}, got {tuple(A.shape)}")
    with torch.no_grad(), _no_autocast(A):
        A = A.detach().float()
        mask = build_mask(nc, use_hn)
        lv = hard_labels(nc, use_hn)
        # Columns that take part in the transport problem.
        keep = torch.ones(n_cols, dtype=torch.bool, device=A.device)
        if flagged_captions != "target":
            keep[:n] = ~nc
            if not use_hn and bool(nc.any()):
                lv[nc] = (~nc).float() / max(int((~nc).sum()), 1)
        if use_hn:
            keep[n] = bool(nc.any())
        if gamma > 0:
            dist = 1.0 - A
            cost = dist / dist.max().clamp_min(1e-12)
            n_keep = int(keep.sum())
            a = torch.full((n,), 1.0 / n, device=A.device)
            b = torch.full((n_keep,), 1.0 / n_keep, device=A.device)
            if hn_capacity == "flagged" and use_hn and bool(nc.any()):
                m_hn = float(nc.sum()) / n
                b = torch.full((n_keep,), (1.0 - m_hn) / (n_keep - 1), device=A.device)
                b[-1] = m_hn  # the HN column is the last kept column
            c_sub, m_sub = cost[:, keep], mask[:, keep]
            pv = torch.zeros(n, n_cols, device=A.device)
            pv[:, keep] = solver(c_sub, a, b, m_sub).float()
            if reuse_transpose:
                pt = pv.T
            else:
                pt = torch.zeros(n_cols, n, device=A.device)
                pt[keep] = solver(c_sub.T.contiguous(), b, a, m_sub.T.contiguous()).float()
            yv = gamma * _rownorm(pv) + (1.0 - gamma) * lv
            yt = gamma * _rownorm(pt) + (1.0 - gamma) * lv.T
        else:
            yv = lv.clone()
            yt = lv.T.clone()
        if normalize_t2v:
            yt = _rownorm(yt)
    return yv, yt.contiguous()


def _kl_rows(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target_r || softmax(logits_r)) per row (0 for an all-zero target row)."""
    logp = torch.log_softmax(logits, dim=1)
    return (torch.xlogy(target, target) - target * logp).sum(dim=1)


def stage2_loss(
    v: torch.Tensor,
    t: torch.Tensor,
    tn: torch.Tensor | None,
    s: torch.Tensor | float,
    nc: torch.Tensor,
    gamma: float,
    solver: Solver | None,
    use_hn: bool = True,
    normalize_t2v: bool = True,
    reuse_transpose: bool = True,
    w_band: float = 1.0,
    band: tuple[float, float] = (-0.7, -0.2),
    flagged_captions: str = "target",
    hn_capacity: str = "uniform",
    w_flagged: float = 1.0,
    detach_hn: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """OT-based unlearning loss on the whole batch.

    A = [v t^T | v_i.tn_i] (or v t^T without HN), Z = s * A, targets from :func:`ot_targets` on
    A.detach(). L_UL = (KL_v + KL_t) / 2 with KL_v = (1/N) sum_i w_i KL(Yv_i || softmax(Z_i)) and
    KL_t = (1/R) sum_r w_r KL(Yt_r || softmax((Z^T)_r)) over the R = N+1 (or N) rows of Z^T. The weights
    are 1 except ``w_flagged`` on the NC image rows and on the HN row (the strength of the push on
    flagged pairs). Total loss L_UL + w_band * band_loss(t, tn); the band term is 0 when ``tn`` is None.

    ``flagged_captions="drop"`` also removes the NC captions from the softmax (columns of Z and rows of
    Z^T), as filtering does; ``"negative"`` keeps them there with zero target. ``detach_hn``: the negated
    captions are constants here (no gradient into the negated path or, through it, the text tower).

    parts (detached): ``kl_v2t``, ``kl_t2v``, ``band`` and ``hn_mass`` (mean target mass that NC rows
    put on the HN column; 0 without HN or NC rows).
    """
    if v.shape != t.shape or v.dim() != 2:
        raise ValueError(f"v and t must both be (N, d), got {tuple(v.shape)} and {tuple(t.shape)}")
    if tn is not None and tn.shape != t.shape:
        raise ValueError(f"tn must match t's shape {tuple(t.shape)}, got {tuple(tn.shape)}")
    if use_hn and tn is None:
        raise ValueError("use_hn=True needs the negated captions tn")
    if gamma > 0 and solver is None:
        raise ValueError("gamma > 0 needs an OT solver")
    nc = nc.to(device=v.device, dtype=torch.bool)
    n = v.shape[0]
    if nc.shape != (n,):
        raise ValueError(f"nc must be ({n},), got {tuple(nc.shape)}")
    with _no_autocast(v):
        v32, t32 = v.float(), t.float()
        tn32 = tn.float() if tn is not None else None
        if tn32 is not None and detach_hn:
            tn32 = tn32.detach()
        sim = v32 @ t32.T
        if use_hn:
            h = (v32 * tn32).sum(dim=1, keepdim=True)
            A = torch.cat([sim, h], dim=1)
        else:
            A = sim
        yv, yt = ot_targets(
            A.detach(), nc, gamma, solver, use_hn=use_hn, normalize_t2v=normalize_t2v,
            reuse_transpose=reuse_transpose, flagged_captions=flagged_captions, hn_capacity=hn_capacity,
        )
        z = _scale(s, v.device) * A
        n_rows_t = z.shape[1]
        w_v = torch.ones(n, device=v.device)
        w_v[nc] = w_flagged
        w_t = torch.ones(n_rows_t, device=v.device)
        if use_hn:
            w_t[n] = w_flagged
        if flagged_captions == "drop":
            cols = torch.ones(n_rows_t, dtype=torch.bool, device=v.device)
            cols[:n] = ~nc
            zv, yv_, zt, yt_, w_t = z[:, cols], yv[:, cols], z.T[cols], yt[cols], w_t[cols]
        else:
            zv, yv_, zt, yt_ = z, yv, z.T, yt
        kl_v = (w_v * _kl_rows(zv, yv_)).sum() / n
        kl_t = (w_t * _kl_rows(zt, yt_)).sum() / len(zt)
        if tn32 is not None:
            band_term = band_loss(t32, tn32, *band)
        else:
            band_term = torch.zeros((), device=v.device)
        loss = 0.5 * (kl_v + kl_t) + w_band * band_term
        if use_hn and bool(nc.any()):
            hn_mass = yv[nc, n].mean()
        else:
            hn_mass = torch.zeros((), device=v.device)
    parts = {
        "kl_v2t": kl_v.detach(),
        "kl_t2v": kl_t.detach(),
        "band": band_term.detach(),
        "hn_mass": hn_mass.detach(),
    }
    return loss, parts
