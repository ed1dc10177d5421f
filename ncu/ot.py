"""Entropic and exact optimal transport with a support mask.

Every solver maps ``(cost (n, m), a (n,), b (m,), mask (n, m) | None)`` to a float32 transport plan
with ``plan[i, j] == 0`` exactly wherever ``mask[i, j]`` is 0. ``mask=None`` allows every entry.

- :func:`sinkhorn` / :class:`SinkhornSolver`: our log-domain Sinkhorn (torch, runs on the input's device).
- :class:`POTSinkhornSolver`: POT's ``sinkhorn_log`` with masked entries priced out.
- :class:`POTEMDSolver`: POT's exact network-simplex ``emd`` with masked entries priced out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ncu.choices import SINKHORN_STOPS

__all__ = [
    "SinkhornInfo",
    "sinkhorn",
    "SinkhornSolver",
    "POTSinkhornSolver",
    "POTEMDSolver",
]


@dataclass
class SinkhornInfo:
    """Diagnostics of one :func:`sinkhorn` call.

    n_iter: iterations run. err: the stopping criterion at the last check (see :func:`sinkhorn`).
    """

    n_iter: int
    err: float


def _validate(
    cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check shapes, marginals and feasibility; return float32 cost, a, b and a bool mask."""
    if cost.dim() != 2:
        raise ValueError(f"cost must be 2-D (n, m), got shape {tuple(cost.shape)}")
    n, m = cost.shape
    if n == 0 or m == 0:
        raise ValueError(f"cost must be non-empty, got shape {tuple(cost.shape)}")
    if a.shape != (n,):
        raise ValueError(f"shape mismatch: a has shape {tuple(a.shape)}, expected ({n},) from cost")
    if b.shape != (m,):
        raise ValueError(f"shape mismatch: b has shape {tuple(b.shape)}, expected ({m},) from cost")
    if mask is None:
        mask_b = torch.ones(n, m, dtype=torch.bool, device=cost.device)
    else:
        if mask.shape != (n, m):
            raise ValueError(
                f"shape mismatch: mask has shape {tuple(mask.shape)}, expected ({n}, {m}) from cost"
            )
        mask_b = mask.to(device=cost.device) != 0
    cost32 = cost.detach().to(dtype=torch.float32)
    a32 = a.detach().to(device=cost.device, dtype=torch.float32)
    b32 = b.detach().to(device=cost.device, dtype=torch.float32)
    if not (torch.isfinite(a32).all() and torch.isfinite(b32).all()):
        raise ValueError("marginals a and b must be finite")
    if (a32 < 0).any() or (b32 < 0).any():
        raise ValueError("marginals a and b must be non-negative")
    sa, sb = float(a32.sum()), float(b32.sum())
    if sa <= 0:
        raise ValueError("marginals must have positive total mass")
    # Half-precision marginals (e.g. 1/N in bfloat16) carry rounding of the order of their eps.
    low_eps = max(torch.finfo(x.dtype).eps if x.is_floating_point() else 0.0 for x in (a, b))
    rtol = max(1e-4, 2.0 * low_eps)
    if abs(sa - sb) > rtol * max(sa, sb):
        raise ValueError(f"marginals must sum to the same total: sum(a)={sa:.6g}, sum(b)={sb:.6g}")
    b32 = b32 * (sa / sb)  # absorb the allowed rounding so the problem is balanced exactly
    if not torch.isfinite(cost32[mask_b]).all():
        raise ValueError("cost must be finite on allowed (unmasked) entries")
    # A row (column) with mass to send but no allowed entry makes the problem infeasible.
    dead_rows = (a32 > 0) & ~mask_b.any(dim=1)
    if dead_rows.any():
        i = int(dead_rows.nonzero()[0])
        raise ValueError(f"row {i} is fully masked while its marginal a[{i}] > 0 (infeasible)")
    dead_cols = (b32 > 0) & ~mask_b.any(dim=0)
    if dead_cols.any():
        j = int(dead_cols.nonzero()[0])
        raise ValueError(f"column {j} is fully masked while its marginal b[{j}] > 0 (infeasible)")
    return cost32, a32, b32, mask_b


def sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor | None = None,
    reg: float = 0.03,
    max_iter: int = 100,
    tol: float = 1e-4,
    return_info: bool = False,
    check_every: int = 5,
    stop: str = "marginal",
) -> torch.Tensor | tuple[torch.Tensor, SinkhornInfo]:
    """Entropic OT plan by log-domain Sinkhorn, with forbidden entries (``mask == 0``).

    Solves ``min <P, C> - reg * H(P)`` s.t. ``P 1 = a``, ``P^T 1 = b``, ``P = 0`` off the mask. The
    iterates are the scaled duals f (rows) and g (columns), starting at 0:

        f_i = reg * (log a_i - LSE_j[(-C_ij + g_j) / reg])
        g_j = reg * (log b_j - LSE_i[(-C_ij + f_i) / reg])
        P_ij = exp((-C_ij + f_i + g_j) / reg),

    with the log-kernel -C/reg set to -inf on masked entries, so those entries are exactly 0. Rows or
    columns with zero marginal get dual -inf and an all-zero plan row/column.

    Stopping rule: after a g update the column marginals hold exactly, so the criterion is the largest
    relative row-marginal violation ``err = max_i |sum_j P_ij - a_i| / a_i`` over rows with a_i > 0.
    It does not grow with n or depend on the total mass. It is checked every ``check_every``
    iterations (each check is one host sync on GPU) and on the last one; the loop stops once
    ``err < tol``. ``stop="dual_l1"`` is the official NCU code's rule instead: after every iteration,
    ``err = sum_i |f_i - f_i^prev|`` (the L1 change of the row duals f = reg * u, in cost units), which
    grows with n and so rarely fires before ``max_iter``.

    The totals of a and b must agree to 1e-4 relative (or twice the eps of a half-precision input);
    b is then rescaled to a's total so that the problem is exactly balanced.

    Always runs in float32 with autocast disabled and without autograd; returns a float32 plan.
    A mask that passes the per-row/column checks can still be infeasible globally (Hall's
    condition); Sinkhorn then runs to ``max_iter`` and ``info.err`` stays large.
    """
    reg = float(reg)
    if not reg > 0 or not math.isfinite(reg):
        raise ValueError(f"reg must be a positive finite number, got {reg}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    if stop not in SINKHORN_STOPS:
        raise ValueError(f"stop={stop!r} is unknown; choose from {SINKHORN_STOPS}")
    with torch.no_grad(), torch.autocast(device_type=cost.device.type, enabled=False):
        cost32, a32, b32, mask_b = _validate(cost, a, b, mask)
        neg_inf = torch.tensor(float("-inf"), device=cost32.device)
        live = mask_b & (a32 > 0)[:, None] & (b32 > 0)[None, :]
        log_k = torch.where(live, -cost32 / reg, neg_inf)
        log_a, log_b = a32.log(), b32.log()  # -inf where the marginal is 0
        row_on, col_on = a32 > 0, b32 > 0
        # u = f / reg and w = g / reg: the scaled duals in units of reg.
        u = torch.zeros_like(a32)
        w = torch.zeros_like(b32)
        err = float("inf")
        n_iter = 0
        for it in range(1, max_iter + 1):
            u_prev = u
            u = torch.where(row_on, log_a - torch.logsumexp(log_k + w[None, :], dim=1), neg_inf)
            w = torch.where(col_on, log_b - torch.logsumexp(log_k + u[:, None], dim=0), neg_inf)
            n_iter = it
            if stop == "dual_l1":
                err = float(reg * (u - u_prev)[row_on].abs().sum())
                if err < tol:
                    break
            elif it % check_every == 0 or it == max_iter:
                log_rows = u + torch.logsumexp(log_k + w[None, :], dim=1)
                err = float((torch.expm1(log_rows - log_a)[row_on]).abs().max())
                if err < tol:
                    break
        plan = torch.exp(log_k + u[:, None] + w[None, :])
        plan = torch.where(live, plan, torch.zeros((), device=plan.device))
    if return_info:
        return plan, SinkhornInfo(n_iter=n_iter, err=err)
    return plan


@dataclass
class SinkhornSolver:
    """Callable wrapper of :func:`sinkhorn` for Hydra (``_target_: ncu.ot.SinkhornSolver``)."""

    reg: float = 0.03
    max_iter: int = 100
    tol: float = 1e-4
    stop: str = "marginal"

    def __call__(
        self,
        cost: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return sinkhorn(cost, a, b, mask, reg=self.reg, max_iter=self.max_iter, tol=self.tol, stop=self.stop)


def _priced_out_numpy(
    cost32: torch.Tensor, a32: torch.Tensor, b32: torch.Tensor, mask_b: torch.Tensor, penalty: float
):
    """float64 numpy copies with masked costs replaced by ``max allowed cost + penalty``."""
    if (a32 <= 0).any() or (b32 <= 0).any():
        raise ValueError("POT solvers need strictly positive marginals a and b")
    c = cost32.double().cpu()
    allowed = mask_b.cpu()
    c_max = float(c[allowed].max()) if allowed.any() else 0.0
    c = torch.where(allowed, c, torch.full_like(c, c_max + penalty))
    a64 = a32.double().cpu()
    b64 = b32.double().cpu()
    b64 = b64 * (a64.sum() / b64.sum())  # POT wants equal totals to float64 precision
    return c.numpy(), a64.numpy(), b64.numpy()


@dataclass
class POTSinkhornSolver:
    """POT's log-domain Sinkhorn (``ot.sinkhorn(..., method="sinkhorn_log")``) in float64 on CPU.

    POT has no support mask, so masked entries get cost ``max allowed cost + 1000 * reg``. Their
    kernel weight is then about exp(-1000) relative to any allowed entry, far below float64
    resolution of the plan, and they are set to exactly 0 afterwards. The result matches the masked
    problem up to that negligible leakage. POT's stopping rule (``stopThr`` on the marginal error)
    differs from :func:`sinkhorn`'s.
    """

    reg: float = 0.03
    max_iter: int = 100
    tol: float = 1e-4

    def __call__(
        self,
        cost: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        import ot as pot

        if not self.reg > 0:
            raise ValueError(f"reg must be positive, got {self.reg}")
        with torch.no_grad(), torch.autocast(device_type=cost.device.type, enabled=False):
            cost32, a32, b32, mask_b = _validate(cost, a, b, mask)
            c, a64, b64 = _priced_out_numpy(cost32, a32, b32, mask_b, 1000.0 * self.reg)
            plan = pot.sinkhorn(
                a64, b64, c, self.reg, method="sinkhorn_log",
                numItermax=self.max_iter, stopThr=self.tol, warn=False,
            )
            out = torch.as_tensor(plan, dtype=torch.float32).to(cost.device)
            return torch.where(mask_b, out, torch.zeros((), device=out.device))


@dataclass
class POTEMDSolver:
    """Exact (unregularised) OT by POT's network simplex ``ot.emd``, in float64 on CPU.

    Masked entries get cost ``max allowed cost + 1e6 * (cost range + 1)``, which makes any plan that
    uses them worse than every feasible masked plan whenever one exists; anything left on them is
    set to 0 (marginals then hold only approximately, which only happens for infeasible masks).
    ``max_size`` bounds n and m: the solver is cubic-ish in size and meant for tests and small
    batches; larger problems raise ValueError.
    """

    max_size: int = 1024
    max_iter: int = 100000

    def __call__(
        self,
        cost: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        import ot as pot

        if cost.dim() == 2 and max(cost.shape) > self.max_size:
            raise ValueError(
                f"POTEMDSolver: problem size {tuple(cost.shape)} exceeds max_size={self.max_size}; "
                "use a Sinkhorn solver or raise max_size"
            )
        with torch.no_grad(), torch.autocast(device_type=cost.device.type, enabled=False):
            cost32, a32, b32, mask_b = _validate(cost, a, b, mask)
            allowed = cost32[mask_b]
            c_range = float(allowed.max() - allowed.min()) if allowed.numel() else 0.0
            c, a64, b64 = _priced_out_numpy(cost32, a32, b32, mask_b, 1e6 * (c_range + 1.0))
            plan = pot.emd(a64, b64, c, numItermax=self.max_iter)
            out = torch.as_tensor(plan, dtype=torch.float32).to(cost.device)
            return torch.where(mask_b, out, torch.zeros((), device=out.device))
