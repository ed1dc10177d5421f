"""The stage-2 OT problem of a global batch, and the Sinkhorn scaling benchmark (time, memory, iterations)."""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ncu.bench.timing import MiB, PeakMemory, sync

# ----------------------------------------------------------------------------------------------- problems


def stage2_ot_problem(
    n: int,
    nc_ratio: float = 0.1,
    dim: int = 256,
    align: float = 0.35,
    noise_rate: float = 0.2,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stage-2 OT problem ``(cost (N, N+1), a, b, mask)`` of a synthetic global batch.

    Unit image features v; a clean caption is ``align * v_i`` plus isotropic noise (cos(v_i, t_i) about
    ``align``, unrelated pairs about 0 +- 1/sqrt(dim), as for a trained CLIP); a ``noise_rate`` fraction of
    captions is shuffled among their pairs; the negated caption sits at cos about -0.45 from its caption
    (inside the band). Flags, mask, cost and marginals are built as ``ncu.objectives.ncu`` builds them.
    """
    from ncu.objectives import ncu as ncu_obj

    if math.floor(nc_ratio * n + 1e-9) < 1:
        raise ValueError(f"nc_ratio={nc_ratio} flags no pair of a batch of {n}: the HN column would get no mass")
    g = torch.Generator().manual_seed(seed)

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=g), dim=-1)

    v = unit(n, dim)
    partner = torch.arange(n)
    noisy = (torch.rand(n, generator=g) < noise_rate).nonzero().flatten()
    partner[noisy] = noisy[torch.randperm(len(noisy), generator=g)]
    t = F.normalize(align * v[partner] + math.sqrt(1 - align**2) * unit(n, dim), dim=1)
    tn = F.normalize(-0.45 * t + math.sqrt(1 - 0.45**2) * unit(n, dim), dim=1)
    a_ext = torch.cat([v @ t.T, (v * tn).sum(dim=1, keepdim=True)], dim=1)
    nc = ncu_obj.select_nc(ncu_obj.nc_scores(v, t, 100.0), nc_ratio)
    dist = 1.0 - a_ext
    cost = dist / dist.max()
    mask = ncu_obj.build_mask(nc, use_hn=True)
    a = torch.full((n,), 1.0 / n)
    b = torch.full((n + 1,), 1.0 / (n + 1))
    return tuple(x.to(device) for x in (cost, a, b, mask))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- sinkhorn


def sinkhorn_scaling(sizes: Sequence[int], device: torch.device, reg: float = 0.03, max_iter: int = 100,
                     tol: float = 1e-4, nc_ratio: float = 0.1, budget_s: float = 1.0, max_reps: int = 5,
                     seed: int = 0, out: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Time and memory of the stage-2 solve per global batch size: our stopping rule vs all ``max_iter``."""
    from ncu.ot import sinkhorn

    def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
        result = fn()  # warm-up, and the result
        times: list[float] = []
        while len(times) < max_reps and (not times or sum(times) < budget_s):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), result

    out(f"device: {device} ({torch.get_num_threads()} threads), reg={reg}, max_iter={max_iter}, tol={tol}, "
        f"NC ratio {nc_ratio}; cost from aligned + noisy unit embeddings (see ncu.bench.stage2_ot_problem)")
    out(f"{'N':>5} {'shape':>12} {'iters':>6} {'err':>9} {'ms':>9} {'ms all':>9} {'x faster':>8} "
        f"{'peak MiB':>9} {'max|dP|*N':>10}")
    rows = []
    for n in sizes:
        problem = stage2_ot_problem(n, nc_ratio=nc_ratio, seed=seed, device=device)
        t_rule, (plan, info) = timed(lambda p=problem: sinkhorn(*p, reg=reg, max_iter=max_iter, tol=tol,
                                                       return_info=True))
        # All iterations: a single convergence check, on the last one.
        t_all, (plan_all, _) = timed(lambda p=problem: sinkhorn(*p, reg=reg, max_iter=max_iter, tol=tol,
                                                      return_info=True, check_every=max_iter))
        with PeakMemory(device) as pm:
            sinkhorn(*problem, reg=reg, max_iter=max_iter, tol=tol)
        diff = float((plan - plan_all).abs().max()) * n
        row = {"n": n, "iters": info.n_iter, "err": info.err, "ms": 1e3 * t_rule, "ms_all": 1e3 * t_all,
               "peak_mib": pm.peak / MiB, "plan_diff": diff}
        rows.append(row)
        out(f"{n:>5} {f'{n}x{n + 1}':>12} {info.n_iter:>6} {info.err:>9.2e} {row['ms']:>9.2f} {row['ms_all']:>9.2f} "
            f"{t_all / t_rule:>8.2f} {row['peak_mib']:>9.1f} {diff:>10.2e}")
        del problem, plan, plan_all
    out(f"peak memory: {pm.method}")
    return rows
