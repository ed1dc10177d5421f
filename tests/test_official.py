"""method=ncu_official is the official code's behaviour on every option that exists."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import compose_cfg
from ncu.objectives.ncu import nc_count, select_nc
from ncu.ot import sinkhorn


def test_ncu_official_sets_every_official_value():
    cfg = compose_cfg(["method=ncu_official"])
    u = cfg.method.unlearn
    assert u.normalize_t2v is False and u.reuse_transpose is False  # unnormalised t2v rows, a second solve
    assert u.flagged_captions == "target" and u.hn_capacity == "uniform" and u.w_flagged == 1.0
    assert cfg.solver.stop == "dual_l1" and (cfg.solver.reg, cfg.solver.max_iter, cfg.solver.tol) == (0.03, 100, 1e-4)
    assert cfg.method.nc_count == "truncate"
    assert cfg.method.stages.unlearn.freeze_token_embedding is False  # the official freeze was a no-op
    assert cfg.method.negation.anchor == "none" and cfg.method.negation.head == "none"
    assert cfg.method.stage1.detach_t is False and cfg.method.gamma == 0.7 and list(cfg.method.band) == [-0.7, -0.2]
    # the project's own defaults are unchanged, and a solver on the command line still wins
    default = compose_cfg([])
    assert default.solver.stop == "marginal" and default.method.nc_count == "floor"
    assert default.method.unlearn.normalize_t2v is True and default.method.unlearn.reuse_transpose is True
    assert compose_cfg(["method=ncu_official", "solver=pot_emd"]).solver._target_ == "ncu.ot.POTEMDSolver"


def test_ncu_official_trains_the_token_embedding_in_stage_2(make_cfg):
    from ncu.config import plan_stages
    from ncu.run import build

    cfg = make_cfg("method=ncu_official", "data.limit=96", "data.batch_size=32")
    _, _, module = build(cfg)
    module.set_stage("unlearn", dict(plan_stages(cfg))["unlearn"])
    named = dict(module.named_parameters())
    assert named["model.token_embedding.weight"].requires_grad
    assert not named["model.positional_embedding"].requires_grad
    assert not named["model.transformer.resblocks.0.attn.in_proj_weight"].requires_grad


def test_the_official_count_truncates_where_float_rounding_falls_short():
    assert 0.29 * 100 < 29  # 28.999999999999996
    assert nc_count(0.29, 100, "truncate") == 28 and nc_count(0.29, 100, "floor") == 29
    assert nc_count(0.4, 128, "truncate") == nc_count(0.4, 128, "floor") == 51
    scores = torch.arange(100.0)
    assert int(select_nc(scores, 0.29, "truncate").sum()) == 28 and bool(select_nc(scores, 0.29, "truncate")[:28].all())


def _official_rule_f64(cost, a, b, mask, reg, max_iter, tol):
    """The official stopping rule written from its description (ncu-method.md §6): scaled duals f, g from 0,
    f <- f + reg (log a - LSE_j[(-C + f + g)/reg]), then g likewise, masked log-kernel -1e6, stop once
    sum_i |f_i - f_i^prev| < tol. Float64 loops over rows and columns."""
    n, m = len(cost), len(cost[0])
    f, g = [0.0] * n, [0.0] * m

    def kernel(i, j):
        return -1e6 if not mask[i][j] else (-cost[i][j] + f[i] + g[j]) / reg

    def lse(values):
        top = max(values)
        return math.log(sum(math.exp(v - top) for v in values)) + top

    it = 0
    for it in range(1, max_iter + 1):
        previous = list(f)
        f = [f[i] + reg * (math.log(a[i]) - lse([kernel(i, j) for j in range(m)])) for i in range(n)]
        g = [g[j] + reg * (math.log(b[j]) - lse([kernel(i, j) for i in range(n)])) for j in range(m)]
        if sum(abs(x - y) for x, y in zip(f, previous)) < tol:
            break
    plan = [[math.exp(kernel(i, j)) if mask[i][j] else 0.0 for j in range(m)] for i in range(n)]
    return torch.tensor(plan, dtype=torch.float64), it


@pytest.mark.parametrize("tol, reg", [(1e-4, 0.03), (1e-2, 0.1), (1e-4, 0.1), (1e-6, 0.5)])
def test_dual_l1_stopping_matches_the_official_rule(tol, reg):
    g = torch.Generator().manual_seed(0)
    n = 7
    sims = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=1)
    cost = 1 - torch.cat([sims @ sims.T, sims[:, :1]], dim=1)
    cost = cost / cost.max()
    mask = torch.ones(n, n + 1, dtype=torch.bool)
    mask[:, -1] = False
    mask[[1, 4], [1, 4]] = False
    mask[[1, 4], -1] = True
    a, b = torch.full((n,), 1 / n), torch.full((n + 1,), 1 / (n + 1))
    want, want_iter = _official_rule_f64(cost.double().tolist(), a.double().tolist(), b.double().tolist(),
                                         mask.tolist(), reg, 100, tol)
    plan, info = sinkhorn(cost, a, b, mask, reg=reg, max_iter=100, tol=tol, stop="dual_l1", return_info=True)
    assert info.n_iter == want_iter and 1 < want_iter  # the same iteration stops both
    torch.testing.assert_close(plan.double(), want, rtol=2e-4, atol=1e-7)
    _, ours = sinkhorn(cost, a, b, mask, reg=reg, max_iter=100, tol=tol, return_info=True)
    if reg != 0.03:  # the rules stop at other iterations (at reg 0.03 neither fires within 100 here)
        assert ours.n_iter != want_iter
