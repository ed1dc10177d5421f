"""Tests of ncu.ot against POT, a plain-domain float64 Sinkhorn and marginal/support invariants."""

from __future__ import annotations

import numpy as np
import ot as pot
import pytest
import torch

from ncu.ot import POTEMDSolver, POTSinkhornSolver, SinkhornSolver, sinkhorn


def masked_problem(seed: int, n: int, drop: float = 0.3):
    """Random cost in [0, 1] on n x (n+1), uniform marginals, random mask that stays feasible.

    The staircase entries (i, i) and (i, i+1) are always allowed: they carry the north-west-corner
    plan of these marginals, so a masked transport plan exists.
    """
    g = torch.Generator().manual_seed(seed)
    m = n + 1
    cost = torch.rand(n, m, generator=g)
    mask = torch.rand(n, m, generator=g) > drop
    idx = torch.arange(n)
    mask[idx, idx] = True
    mask[idx, idx + 1] = True
    a = torch.full((n,), 1.0 / n)
    b = torch.full((m,), 1.0 / m)
    return cost, a, b, mask


def plain_sinkhorn_f64(cost, a, b, mask, reg, n_iter=20000):
    """Reference: classic u/v scaling on K = exp(-C/reg) * mask, in float64 numpy."""
    c = cost.double().numpy()
    k = np.exp(-c / reg) * mask.double().numpy()
    a64, b64 = a.double().numpy(), b.double().numpy()
    u = np.ones_like(a64)
    v = np.ones_like(b64)
    for _ in range(n_iter):
        u = a64 / (k @ v)
        v = b64 / (k.T @ u)
    return torch.from_numpy(u[:, None] * k * v[None, :])


def assert_gibbs_form(plan: torch.Tensor, cost: torch.Tensor, mask: torch.Tensor, reg: float) -> None:
    """log plan + cost / reg is additive (f_i + g_j) on the allowed cells: fitted by least squares, float64."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    n, m = mask.shape
    target = torch.log(plan[rows, cols].double()) + cost[rows, cols].double() / reg
    design = torch.zeros(len(rows), n + m, dtype=torch.float64)
    design[torch.arange(len(rows)), rows] = 1.0
    design[torch.arange(len(rows)), n + cols] = 1.0
    fit = torch.linalg.lstsq(design, target[:, None]).solution
    residual = (design @ fit)[:, 0] - target
    assert residual.abs().max() < 1e-3 * max(1.0, float(target.abs().max()))


@pytest.mark.parametrize("seed,n", [(0, 8), (1, 17), (2, 32), (3, 64)])
def test_masked_marginals_and_exact_zeros(seed, n):
    cost, a, b, mask = masked_problem(seed, n)
    plan, info = sinkhorn(cost, a, b, mask, reg=0.05, max_iter=5000, tol=1e-5, return_info=True)
    assert plan.dtype == torch.float32
    assert info.err < 1e-5
    # The row marginals are what the stopping rule measures; the columns hold by construction after the last
    # (column) update, so the independent check is the form of the solution: plan = exp(f_i + g_j - C_ij/reg).
    assert torch.allclose(plan.sum(1), a, rtol=2e-5, atol=0)
    assert_gibbs_form(plan, cost, mask, 0.05)
    assert (plan[~mask] == 0).all()
    assert (plan[mask] > 0).all()


def test_matches_pot_unmasked():
    g = torch.Generator().manual_seed(10)
    n, m = 12, 13
    cost = torch.rand(n, m, generator=g)
    a = torch.rand(n, generator=g) + 0.5
    a = a / a.sum()
    b = torch.full((m,), 1.0 / m)
    reg = 0.05
    a64 = a.double().numpy() / a.double().numpy().sum()  # balanced in float64, as POT expects
    b64 = np.full(m, 1.0 / m)
    ref = pot.sinkhorn(
        a64, b64, cost.double().numpy(), reg, method="sinkhorn_log", numItermax=5000, stopThr=1e-10
    )
    plan = sinkhorn(cost, a, b, None, reg=reg, max_iter=20000, tol=1e-6)
    assert torch.allclose(plan.double(), torch.from_numpy(ref), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("seed", [4, 5])
def test_matches_plain_domain_reference_masked(seed):
    cost, a, b, mask = masked_problem(seed, 16)
    reg = 0.1
    ref = plain_sinkhorn_f64(cost, a, b, mask, reg)
    plan = sinkhorn(cost, a, b, mask, reg=reg, max_iter=20000, tol=1e-6)
    assert torch.allclose(plan.double(), ref, rtol=1e-3, atol=1e-8)


def test_zero_marginal_row_and_column_get_no_mass():
    cost, _, _, mask = masked_problem(6, 6)
    a = torch.tensor([0.2, 0.0, 0.2, 0.2, 0.2, 0.2])
    b = torch.tensor([0.2, 0.2, 0.2, 0.0, 0.2, 0.1, 0.1])
    plan = sinkhorn(cost, a, b, mask, reg=0.05, max_iter=5000, tol=1e-6)
    assert torch.isfinite(plan).all()
    assert (plan[1] == 0).all() and (plan[:, 3] == 0).all()
    assert torch.allclose(plan.sum(1), a, atol=1e-6)
    assert torch.allclose(plan.sum(0), b, atol=1e-6)


@pytest.mark.parametrize(
    "make_cost",
    [
        lambda c: 1e-6 * c,  # all costs near 0
        lambda c: 1.0 - 1e-6 * c,  # all costs near 1
        lambda c: c,
    ],
)
def test_finite_on_degenerate_costs_and_tiny_reg(make_cost):
    cost, a, b, mask = masked_problem(7, 24)
    for reg in (1e-3, 0.03):
        plan = sinkhorn(make_cost(cost), a, b, mask, reg=reg, max_iter=200)
        assert torch.isfinite(plan).all()
        assert (plan[~mask] == 0).all()
        # Whatever the convergence state, an entropic plan keeps the Gibbs form on the allowed cells.
        if reg == 0.03:
            assert_gibbs_form(plan, make_cost(cost), mask, reg)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_float32(dtype):
    cost, a, b, mask = masked_problem(8, 33)
    plan = sinkhorn(cost.to(dtype), a.to(dtype), b.to(dtype), mask, reg=0.03, max_iter=300)
    assert plan.dtype == torch.float32
    assert torch.isfinite(plan).all()
    assert (plan[~mask] == 0).all()
    assert torch.allclose(plan.sum(), torch.tensor(1.0), rtol=1e-2)


def test_autocast_output_is_float32():
    cost, a, b, mask = masked_problem(9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = sinkhorn(cost, a, b, mask, reg=0.05, max_iter=2000, tol=1e-5)
        solver_plan = SinkhornSolver(reg=0.05, max_iter=2000, tol=1e-5)(cost, a, b, mask)
    assert plan.dtype == torch.float32 and solver_plan.dtype == torch.float32
    ref = sinkhorn(cost, a, b, mask, reg=0.05, max_iter=2000, tol=1e-5)
    assert torch.equal(plan, ref)


def test_runs_without_grad():
    cost, a, b, mask = masked_problem(9, 8)
    cost.requires_grad_(True)
    plan = sinkhorn(cost, a, b, mask)
    assert not plan.requires_grad


def test_early_stopping_on_easy_problem():
    cost, a, b, _ = masked_problem(11, 8)
    plan, info = sinkhorn(cost, a, b, reg=0.5, max_iter=1000, tol=1e-4, return_info=True)
    assert info.n_iter < 1000
    assert info.err < 1e-4
    rel = ((plan.sum(1) - a).abs() / a).max()
    assert float(rel) < 1e-4
    # Stopping late costs accuracy nothing: the answer agrees with a long run.
    long = sinkhorn(cost, a, b, reg=0.5, max_iter=5000, tol=1e-7)
    assert torch.allclose(plan, long, rtol=1e-3)


def test_max_iter_is_respected_and_err_is_reported():
    cost, a, b, mask = masked_problem(12, 32)
    plan, info = sinkhorn(cost, a, b, mask, reg=0.01, max_iter=7, tol=1e-9, return_info=True)
    assert info.n_iter == 7
    rel = float(((plan.double().sum(1) - a.double()).abs() / a.double()).max())
    assert rel > 1e-3  # far from converged after 7 iterations
    assert info.err == pytest.approx(rel, rel=1e-3)


def test_marginal_totals_within_rounding_are_balanced():
    cost, a, b, mask = masked_problem(18, 16)
    b_off = b * (1 + 5e-5)  # inside the accepted rounding, yet 5x above tol if left unbalanced
    plan, info = sinkhorn(cost, a, b_off, mask, reg=0.05, max_iter=5000, tol=1e-5, return_info=True)
    assert info.err < 1e-5 and info.n_iter < 5000
    assert torch.allclose(plan.sum(1), a, rtol=2e-5, atol=0)


def test_emd_never_uses_a_masked_entry_even_when_cheaper():
    # Row 0 may only use column 0, so the only masked plan is the diagonal (cost 1). Using the
    # forbidden cell (0, 1), whose own cost is 0, would make the total cheaper.
    cost = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[True, False], [True, True]])
    half = torch.tensor([0.5, 0.5])
    plan = POTEMDSolver()(cost, half, half, mask)
    assert plan[0, 1] == 0
    assert torch.allclose(plan, torch.tensor([[0.5, 0.0], [0.0, 0.5]]), atol=1e-5)


@pytest.mark.parametrize(
    "solver",
    [
        POTSinkhornSolver(reg=0.05, max_iter=5000, tol=1e-9),
        POTEMDSolver(max_size=64),
        SinkhornSolver(reg=0.05, max_iter=5000, tol=1e-6),
    ],
    ids=["pot_sinkhorn", "pot_emd", "ours"],
)
def test_solver_contract(solver):
    cost, a, b, mask = masked_problem(13, 20)
    plan = solver(cost, a, b, mask)
    assert plan.dtype == torch.float32 and plan.shape == cost.shape
    assert (plan[~mask] == 0).all()
    assert torch.allclose(plan.sum(1), a, rtol=1e-4, atol=1e-7)
    assert torch.allclose(plan.sum(0), b, rtol=1e-4, atol=1e-7)
    # No mask means every entry is allowed.
    assert torch.allclose(solver(cost, a, b).sum(0), b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("reg", [0.05, 0.5])
def test_pot_sinkhorn_agrees_with_ours_masked(reg):
    cost, a, b, mask = masked_problem(14, 12)
    ours = sinkhorn(cost, a, b, mask, reg=reg, max_iter=20000, tol=1e-6)
    theirs = POTSinkhornSolver(reg=reg, max_iter=20000, tol=1e-10)(cost, a, b, mask)
    assert torch.allclose(ours, theirs, rtol=1e-3, atol=1e-8)


def test_emd_is_optimal_among_masked_plans():
    cost, a, b, mask = masked_problem(15, 10)
    p_emd = POTEMDSolver()(cost, a, b, mask)
    p_ent = sinkhorn(cost, a, b, mask, reg=0.005, max_iter=5000, tol=1e-6)
    assert float((p_emd * cost).sum()) <= float((p_ent * cost).sum()) + 1e-4
    # Without a mask it reproduces POT's unmasked optimum.
    unmasked = POTEMDSolver()(cost, a, b)
    ref = pot.emd2(a.double().numpy(), b.double().numpy(), cost.double().numpy())
    assert abs(float((unmasked.double() * cost.double()).sum()) - ref) < 1e-5


def test_emd_rejects_large_problems():
    cost, a, b, mask = masked_problem(16, 8)
    with pytest.raises(ValueError, match="max_size"):
        POTEMDSolver(max_size=4)(cost, a, b, mask)


def test_hydra_instantiation():
    from hydra.utils import instantiate

    solver = instantiate({"_target_": "ncu.ot.SinkhornSolver", "reg": 0.1, "max_iter": 50, "tol": 1e-3})
    assert isinstance(solver, SinkhornSolver) and solver.reg == 0.1 and solver.max_iter == 50
    emd = instantiate({"_target_": "ncu.ot.POTEMDSolver", "max_size": 16})
    assert emd.max_size == 16


def test_bad_inputs_raise():
    cost, a, b, mask = masked_problem(17, 6)
    with pytest.raises(ValueError, match="shape mismatch"):
        sinkhorn(cost, a[:-1], b, mask)
    with pytest.raises(ValueError, match="shape mismatch"):
        sinkhorn(cost, a, b[:-1], mask)
    with pytest.raises(ValueError, match="mask"):
        sinkhorn(cost, a, b, mask[:, :-1])
    with pytest.raises(ValueError, match="2-D"):
        sinkhorn(cost[0], a, b, mask)
    with pytest.raises(ValueError, match="reg"):
        sinkhorn(cost, a, b, mask, reg=-0.1)
    with pytest.raises(ValueError, match="reg"):
        sinkhorn(cost, a, b, mask, reg=0.0)
    with pytest.raises(ValueError, match="same total"):
        sinkhorn(cost, a, 2 * b, mask)
    with pytest.raises(ValueError, match="non-negative"):
        bad = a.clone()
        bad[0], bad[1] = -0.1, bad[1] + 0.1
        sinkhorn(cost, bad, b, mask)
    row_dead = mask.clone()
    row_dead[3] = False
    with pytest.raises(ValueError, match="row 3 is fully masked"):
        sinkhorn(cost, a, b, row_dead)
    col_dead = mask.clone()
    col_dead[:, 2] = False
    with pytest.raises(ValueError, match="column 2 is fully masked"):
        sinkhorn(cost, a, b, col_dead)
    with pytest.raises(ValueError, match="column 2 is fully masked"):
        POTSinkhornSolver()(cost, a, b, col_dead)
    nan_cost = cost.clone()
    nan_cost[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        sinkhorn(nan_cost, a, b, mask)
    # A non-finite cost on a forbidden entry is fine: it is never used.
    masked_nan = mask.clone()
    masked_nan[0, 0] = False
    assert torch.isfinite(sinkhorn(nan_cost, a, b, masked_nan)).all()
