"""Tests of ncu.objectives.ncu against hand loops, float64 references and the spec's invariants."""

from __future__ import annotations

import math

import numpy as np
import ot as pot
import pytest
import torch
import torch.nn.functional as F

from ncu.objectives.ncu import (
    band_loss,
    build_mask,
    hard_labels,
    nc_scores,
    ot_targets,
    select_nc,
    stage1_loss,
    stage2_loss,
)
from ncu.ot import POTEMDSolver, SinkhornSolver

GAMMA = 0.7
TIGHT = SinkhornSolver(reg=0.03, max_iter=20000, tol=1e-6)


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def noisy_batch(n: int = 32, d: int = 64, n_bad: int = 4, seed: int = 0):
    """n well-separated concepts; the captions of the first n_bad pairs are cyclically shuffled."""
    g = torch.Generator().manual_seed(seed)
    centers = unit(torch.randn(n, d, generator=g))
    v = unit(centers + 0.1 * torch.randn(n, d, generator=g))
    t = unit(centers + 0.1 * torch.randn(n, d, generator=g))
    bad = torch.randperm(n, generator=g)[:n_bad]
    t[bad] = t[bad.roll(1)].clone()
    # Negated captions roughly opposite their captions, so cos(t, tn) lands near the band.
    tn = unit(-0.4 * t + torch.randn(n, d, generator=g) / math.sqrt(d))
    nc = torch.zeros(n, dtype=torch.bool)
    nc[bad] = True
    return v, t, tn, nc


def extended_similarity(v, t, tn):
    return torch.cat([v @ t.T, (v * tn).sum(1, keepdim=True)], dim=1)


def dot(x, y) -> float:
    return float(sum(float(p) * float(q) for p, q in zip(x, y)))


# ----------------------------------------------------------------------------- detection


def test_nc_scores_hand_loop():
    v, t, _, _ = noisy_batch(n=6, d=5, n_bad=2, seed=1)
    s = torch.tensor(30.0)
    pi = nc_scores(v, t, s)
    assert pi.dtype == torch.float32 and pi.shape == (6,)
    for i in range(6):
        num = math.exp(30.0 * dot(v[i], t[i]))
        den = sum(math.exp(30.0 * dot(v[i], t[j])) for j in range(6))
        assert abs(float(pi[i]) - num / den) < 1e-5 * max(1.0, num / den)


def test_nc_scores_no_grad():
    v, t, _, _ = noisy_batch(n=6, d=5, seed=2)
    v.requires_grad_(True)
    assert not nc_scores(v, t, torch.tensor(10.0, requires_grad=True)).requires_grad


def test_select_nc_picks_k_lowest_with_index_tie_break():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(40, generator=g)
    mask = select_nc(scores, 0.2)
    expected = sorted(range(40), key=lambda i: float(scores[i]))[:8]
    assert mask.dtype == torch.bool and int(mask.sum()) == 8
    assert set(torch.nonzero(mask).flatten().tolist()) == set(expected)
    tied = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.9])
    assert select_nc(tied, 0.4).tolist() == [False, True, True, False, False]
    assert int(select_nc(torch.rand(100, generator=g), 0.29).sum()) == 29
    assert int(select_nc(torch.rand(10, generator=g), 0.0).sum()) == 0
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="ratio"):
            select_nc(scores, bad)


def test_planted_mismatches_are_flagged():
    for seed in range(3):
        v, t, _, nc_true = noisy_batch(n=32, n_bad=4, seed=seed)
        flagged = select_nc(nc_scores(v, t, torch.tensor(100.0)), 4 / 32)
        assert torch.equal(flagged, nc_true)


# ----------------------------------------------------------------------------- stage 1


def test_band_loss_hand_case():
    cosines = [-1.0, 0.0, -0.5, -0.1]  # below, above, inside, above the band [-0.7, -0.2]
    t = torch.tensor([[1.0, 0.0]] * 4)
    tn = torch.tensor([[c, math.sqrt(1.0 - c * c)] for c in cosines])
    # penalties: 0.3, 0.2, 0, 0.1
    assert abs(float(band_loss(t, tn)) - 0.6 / 4) < 1e-6
    assert float(band_loss(t, tn, low=-1.5, high=0.5)) == 0.0
    assert abs(float(band_loss(t, tn, low=-0.4, high=-0.3)) - (0.6 + 0.3 + 0.1 + 0.2) / 4) < 1e-6


def naive_stage1(v, t, tn, s, clean):
    rows = [i for i in range(len(clean)) if clean[i]]
    n = len(rows)

    def log_sigmoid(x):
        return math.log(1.0 / (1.0 + math.exp(-x)))

    cyc = band = sig_pos = sig_neg = 0.0
    for i in rows:
        c = dot(t[i], tn[i])
        band += max(0.0, c + 0.2) + max(0.0, -0.7 - c)
        for j in rows:
            cyc += (dot(t[i], t[j]) - dot(tn[i], tn[j])) ** 2
            y = 1.0 if i == j else -1.0
            sig_pos -= log_sigmoid(y * s * dot(v[i], t[j]))
            sig_neg -= log_sigmoid(-y * s * dot(v[i], tn[j]))
    return {"cyc": cyc / n, "band": band / n, "sig_pos": sig_pos / n, "sig_neg": sig_neg / n}


def test_stage1_matches_naive_loops():
    g = torch.Generator().manual_seed(4)
    v, t = unit(torch.randn(5, 4, generator=g)), unit(torch.randn(5, 4, generator=g))
    tn = unit(-0.6 * t + 0.5 * torch.randn(5, 4, generator=g))
    clean = torch.tensor([True, False, True, True, True])
    s = 20.0
    ref = naive_stage1(v, t, tn, s, clean.tolist())
    loss, parts = stage1_loss(v, t, tn, torch.tensor(s), clean)
    for key, val in ref.items():
        assert abs(float(parts[key]) - val) < 1e-4 * max(1.0, abs(val)), key
    total = 10 * ref["cyc"] + 10 * ref["band"] + ref["sig_pos"] + ref["sig_neg"]
    assert abs(float(loss) - total) < 1e-4 * total
    loss_w, _ = stage1_loss(v, t, tn, s, clean, w_cyc=0.5, w_band=2.0, w_sig_pos=3.0, w_sig_neg=0.0)
    total_w = 0.5 * ref["cyc"] + 2.0 * ref["band"] + 3.0 * ref["sig_pos"]
    assert abs(float(loss_w) - total_w) < 1e-4 * total_w
    assert all(not p.requires_grad for p in parts.values())


def test_stage1_ignores_noisy_rows_and_is_finite_in_bf16():
    v, t, tn, nc = noisy_batch(n=16, n_bad=3, seed=5)
    loss, _ = stage1_loss(v, t, tn, torch.tensor(100.0), ~nc)
    v2 = v.clone()
    v2[nc] = unit(torch.randn(int(nc.sum()), v.shape[1]))  # changing noisy rows changes nothing
    loss2, _ = stage1_loss(v2, t, tn, torch.tensor(100.0), ~nc)
    assert torch.allclose(loss, loss2)
    lb, _ = stage1_loss(v.bfloat16(), t.bfloat16(), tn.bfloat16(), torch.tensor(100.0), ~nc)
    assert lb.dtype == torch.float32 and torch.isfinite(lb)
    with pytest.raises(ValueError, match="clean"):
        stage1_loss(v, t, tn, 100.0, torch.zeros(16, dtype=torch.bool))


# ----------------------------------------------------------------------------- masks, labels


def test_build_mask_and_hard_labels_tables():
    nc = torch.tensor([False, True, False, True])
    n = 4
    mask = build_mask(nc)
    labels = hard_labels(nc)
    assert mask.shape == (n, n + 1) and labels.shape == (n, n + 1)
    for i in range(n):
        for j in range(n + 1):
            if j == n:
                want = bool(nc[i])
            else:
                want = not (j == i and bool(nc[i]))
            assert bool(mask[i, j]) == want
            lab = (j == n) if nc[i] else (j == i)
            assert float(labels[i, j]) == float(lab)
    m2 = build_mask(nc, use_hn=False)
    assert m2.shape == (n, n)
    assert m2[1, 1].item() is False and m2[0, 0].item() is True and int((~m2).sum()) == 2
    l2 = hard_labels(nc, use_hn=False)
    assert torch.allclose(l2.sum(1), torch.ones(n))
    assert l2[1, 1] == 0 and l2[3, 3] == 0 and l2[0, 0] == 1
    assert torch.allclose(l2[1, [0, 2, 3]], torch.full((3,), 1 / 3))


# ----------------------------------------------------------------------------- OT targets


@pytest.fixture(scope="module")
def batch32():
    v, t, tn, nc = noisy_batch(n=32, n_bad=4, seed=6)
    return extended_similarity(v, t, tn), nc


def test_v2t_targets_properties(batch32):
    A, nc = batch32
    n = nc.numel()
    yv, yt = ot_targets(A, nc, GAMMA, SinkhornSolver())
    assert yv.shape == (n, n + 1) and yt.shape == (n + 1, n)
    assert yv.dtype == torch.float32 and not yv.requires_grad
    assert torch.allclose(yv.sum(1), torch.ones(n), atol=1e-5)
    idx = torch.nonzero(nc).flatten()
    assert (yv[idx, n] >= 1 - GAMMA - 1e-6).all()
    assert (yv[idx, idx] == 0).all()
    assert (yv[~nc, n] == 0).all()
    # Clean rows keep at least the hard-label share on their own caption.
    clean = torch.nonzero(~nc).flatten()
    assert (yv[clean, clean] >= 1 - GAMMA).all()
    assert torch.allclose(yt.sum(1), torch.ones(n + 1), atol=1e-5)


def test_t2v_raw_sums(batch32):
    A, nc = batch32
    n, k = nc.numel(), int(nc.sum())
    _, yt = ot_targets(A, nc, GAMMA, TIGHT, normalize_t2v=False)
    sums = yt.sum(1)
    assert torch.allclose(sums[:n][~nc], torch.ones(n - k), atol=1e-5)
    assert torch.allclose(sums[:n][nc], torch.full((k,), GAMMA), atol=1e-5)
    assert abs(float(sums[n]) - (GAMMA + (1 - GAMMA) * k)) < 1e-5


def test_reuse_transpose_matches_second_solve(batch32):
    A, nc = batch32
    shapes = []

    def counting(cost, a, b, mask=None):  # records each solve: the option must change what is solved
        shapes.append(tuple(cost.shape))
        return TIGHT(cost, a, b, mask)

    _, yt1 = ot_targets(A, nc, GAMMA, counting, reuse_transpose=True)
    assert shapes == [(A.shape[0], A.shape[1])]
    _, yt2 = ot_targets(A, nc, GAMMA, counting, reuse_transpose=False)
    assert shapes[1:] == [(A.shape[0], A.shape[1]), (A.shape[1], A.shape[0])]  # a second, text->image solve
    assert (yt1 - yt2).abs().max() < 2e-3


def test_gamma_zero_is_hard_labels_without_solver(batch32):
    A, nc = batch32
    n = nc.numel()

    def forbidden(*args):
        raise AssertionError("solver must not run when gamma == 0")

    yv, yt = ot_targets(A, nc, 0.0, forbidden, normalize_t2v=False)
    onehot = torch.zeros(n, n + 1)
    for i in range(n):
        onehot[i, n if nc[i] else i] = 1.0
    assert torch.equal(yv, onehot)
    assert torch.equal(yt, onehot.T)
    _, yt_norm = ot_targets(A, nc, 0.0, forbidden)
    want = onehot.T.clone()
    want[n] /= int(nc.sum())  # the HN row is normalised; NC caption rows stay zero
    assert torch.equal(yt_norm, want)


def test_no_hn_targets(batch32):
    A, nc = batch32
    n = nc.numel()
    yv, yt = ot_targets(A[:, :n], nc, GAMMA, SinkhornSolver(), use_hn=False)
    assert yv.shape == (n, n) and yt.shape == (n, n)
    assert torch.allclose(yv.sum(1), torch.ones(n), atol=1e-5)
    idx = torch.nonzero(nc).flatten()
    assert (yv[idx, idx] == 0).all()
    assert torch.allclose(yt.sum(1), torch.ones(n), atol=1e-5)
    assert (yt[idx, idx] == 0).all()


def test_no_noisy_rows_leaves_hn_column_empty(batch32):
    A, nc = batch32
    n = nc.numel()
    none = torch.zeros(n, dtype=torch.bool)
    yv, yt = ot_targets(A, none, GAMMA, SinkhornSolver())
    assert torch.isfinite(yv).all() and torch.isfinite(yt).all()
    assert (yv[:, n] == 0).all() and (yt[n] == 0).all()
    assert torch.allclose(yv.sum(1), torch.ones(n), atol=1e-5)


def test_bad_gamma_and_shape(batch32):
    A, nc = batch32
    with pytest.raises(ValueError, match="gamma"):
        ot_targets(A, nc, 1.5, SinkhornSolver())
    with pytest.raises(ValueError, match="shape"):
        ot_targets(A[:, :-1], nc, GAMMA, SinkhornSolver())


# ----------------------------------------------------------------------------- stage 2


def reference_targets_f64(A: np.ndarray, nc: list[bool], gamma: float, reg: float):
    """Independent float64 targets: plain Sinkhorn on exp(-C/reg) * mask, normalised t2v rows."""
    n = len(nc)
    cost = (1.0 - A) / (1.0 - A).max()
    mask = np.ones((n, n + 1))
    hard = np.zeros((n, n + 1))
    for i in range(n):
        if nc[i]:
            mask[i, i] = 0.0
            hard[i, n] = 1.0
        else:
            mask[i, n] = 0.0
            hard[i, i] = 1.0
    kern = np.exp(-cost / reg) * mask
    a, b = np.full(n, 1.0 / n), np.full(n + 1, 1.0 / (n + 1))
    u, w = np.ones(n), np.ones(n + 1)
    for _ in range(20000):
        u = a / (kern @ w)
        w = b / (kern.T @ u)
    plan = u[:, None] * kern * w[None, :]
    yv = gamma * plan / plan.sum(1, keepdims=True) + (1 - gamma) * hard
    pt = plan.T
    yt = gamma * pt / pt.sum(1, keepdims=True) + (1 - gamma) * hard.T
    yt = yt / yt.sum(1, keepdims=True)
    return yv, yt


def test_stage2_matches_manual_kl():
    g = torch.Generator().manual_seed(7)
    n, d = 5, 3
    v = unit(torch.randn(n, d, generator=g))
    t = unit(v + 0.4 * torch.randn(n, d, generator=g))
    tn = unit(-0.5 * t + 0.5 * torch.randn(n, d, generator=g))
    nc = torch.tensor([False, False, True, False, False])
    s = 12.0
    loss, parts = stage2_loss(v, t, tn, torch.tensor(s), nc, GAMMA, TIGHT)

    A = extended_similarity(v, t, tn).double().numpy()
    yv, yt = reference_targets_f64(A, nc.tolist(), GAMMA, reg=0.03)
    z = s * A

    def kl_rows(target, logits):
        total = 0.0
        for r in range(target.shape[0]):
            lse = math.log(sum(math.exp(x) for x in logits[r]))
            for c in range(target.shape[1]):
                if target[r, c] > 0:
                    total += target[r, c] * (math.log(target[r, c]) - (logits[r, c] - lse))
        return total / target.shape[0]

    kl_v, kl_t = kl_rows(yv, z), kl_rows(yt, z.T)
    band = sum(
        max(0.0, dot(t[i], tn[i]) + 0.2) + max(0.0, -0.7 - dot(t[i], tn[i])) for i in range(n)
    ) / n
    assert abs(float(parts["kl_v2t"]) - kl_v) < 1e-4 * max(1.0, kl_v)
    assert abs(float(parts["kl_t2v"]) - kl_t) < 1e-4 * max(1.0, kl_t)
    assert abs(float(parts["band"]) - band) < 1e-6
    assert abs(float(loss) - (0.5 * (kl_v + kl_t) + band)) < 1e-4 * max(1.0, float(loss))
    assert abs(float(parts["hn_mass"]) - yv[2, n]) < 1e-4
    loss_w, _ = stage2_loss(v, t, tn, s, nc, GAMMA, TIGHT, w_band=3.0)
    assert abs(float(loss_w) - (0.5 * (kl_v + kl_t) + 3.0 * band)) < 1e-4 * max(1.0, float(loss_w))


def test_stage2_gradients_reach_features_not_targets():
    v, t, tn, nc = noisy_batch(n=16, n_bad=2, seed=8)
    v, t, tn = (x.clone().requires_grad_(True) for x in (v, t, tn))
    logit_scale = torch.tensor(math.log(50.0), requires_grad=True)
    seen = []

    def recording_solver(cost, a, b, mask):
        seen.append((cost.requires_grad, torch.is_grad_enabled()))
        return SinkhornSolver()(cost, a, b, mask)

    loss, parts = stage2_loss(v, t, tn, logit_scale.exp(), nc, GAMMA, recording_solver)
    loss.backward()
    assert seen == [(False, False)]
    for x in (v, t, tn, logit_scale):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in parts.values())

    # With fixed targets the gradient is that of soft-label cross-entropy: check it by autograd on a
    # loss written with the targets as constants.
    v2, t2, tn2 = (x.detach().clone().requires_grad_(True) for x in (v, t, tn))
    A = extended_similarity(v2, t2, tn2)
    yv, yt = ot_targets(A.detach(), nc, GAMMA, SinkhornSolver())
    z = 50.0 * A
    ce = -(yv * z.log_softmax(1)).sum() / 16 - (yt * z.T.log_softmax(1)).sum() / 17
    ref_loss = 0.5 * ce + band_loss(t2, tn2)
    ref_loss.backward()
    v3, t3, tn3 = (x.detach().clone().requires_grad_(True) for x in (v, t, tn))
    loss3, _ = stage2_loss(v3, t3, tn3, 50.0, nc, GAMMA, SinkhornSolver())
    loss3.backward()
    for got, want in ((v3, v2), (t3, t2), (tn3, tn2)):
        assert torch.allclose(got.grad, want.grad, rtol=1e-4, atol=1e-6)


def test_stage2_low_precision_and_ablations():
    v, t, tn, nc = noisy_batch(n=16, n_bad=2, seed=9)
    s = torch.tensor(100.0)
    lb, _ = stage2_loss(v.bfloat16(), t.bfloat16(), tn.bfloat16(), s, nc, GAMMA, SinkhornSolver())
    assert lb.dtype == torch.float32 and torch.isfinite(lb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        la, _ = stage2_loss(v, t, tn, s, nc, GAMMA, SinkhornSolver())
    assert la.dtype == torch.float32 and torch.isfinite(la)
    ref, _ = stage2_loss(v, t, tn, s, nc, GAMMA, SinkhornSolver())
    assert torch.allclose(la, ref)  # autocast does not lower the loss precision
    # ncu_no_ot: hard targets only, no solver needed.
    l0, p0 = stage2_loss(v, t, tn, s, nc, 0.0, None)
    assert torch.isfinite(l0) and abs(float(p0["hn_mass"]) - 1.0) < 1e-6
    # ncu_no_hn: no negated captions at all.
    l1, p1 = stage2_loss(v, t, None, s, nc, GAMMA, SinkhornSolver(), use_hn=False)
    assert torch.isfinite(l1) and float(p1["band"]) == 0.0 and float(p1["hn_mass"]) == 0.0
    with pytest.raises(ValueError, match="tn"):
        stage2_loss(v, t, None, s, nc, GAMMA, SinkhornSolver(), use_hn=True)


# ----------------------------------------------------------------------------- stage-2 options


def reference_targets_options_f64(A: np.ndarray, nc: list[bool], gamma: float, reg: float,
                                  flagged_captions: str, hn_capacity: str):
    """Independent float64 targets for the options: POT's Sinkhorn on the kept columns with the intended
    marginals (flagged captions out when not 'target'; HN capacity k/N when 'flagged')."""
    n, k = len(nc), sum(nc)
    cost = (1.0 - A) / (1.0 - A).max()
    keep = [not (flagged_captions != "target" and nc[j]) for j in range(n)] + [k > 0]
    mask = np.ones((n, n + 1))
    hard = np.zeros((n, n + 1))
    for i in range(n):
        mask[i, i] = 0.0 if nc[i] else 1.0
        mask[i, n] = 1.0 if nc[i] else 0.0
        hard[i, n if nc[i] else i] = 1.0
    cols = [j for j in range(n + 1) if keep[j]]
    if hn_capacity == "flagged":
        b = np.array([(1 - k / n) / (len(cols) - 1)] * (len(cols) - 1) + [k / n])
    else:
        b = np.full(len(cols), 1.0 / len(cols))
    big = np.where(mask[:, cols] > 0, cost[:, cols], 1e3)  # a forbidden entry costs e^-1e3/reg: exactly 0
    plan = np.zeros((n, n + 1))
    plan[:, cols] = pot.sinkhorn(np.full(n, 1.0 / n), b, big, reg, method="sinkhorn_log",
                                 numItermax=20000, stopThr=1e-9)
    yv = gamma * plan / plan.sum(1, keepdims=True) + (1 - gamma) * hard
    pt = plan.T
    sums = pt.sum(1, keepdims=True)
    yt = gamma * np.divide(pt, sums, out=np.zeros_like(pt), where=sums > 0) + (1 - gamma) * hard.T
    sums = yt.sum(1, keepdims=True)
    return yv, np.divide(yt, sums, out=np.zeros_like(yt), where=sums > 0), plan


@pytest.mark.parametrize("flagged_captions", ["target", "negative"])
# The reference solve of the flagged capacity runs its full 20000 iterations: slow.
@pytest.mark.parametrize("hn_capacity", ["uniform", pytest.param("flagged", marks=pytest.mark.slow)])
def test_target_options_match_pot(batch32, flagged_captions, hn_capacity):
    A, nc = batch32
    n, k = nc.numel(), int(nc.sum())
    yv, yt = ot_targets(A, nc, GAMMA, TIGHT, flagged_captions=flagged_captions, hn_capacity=hn_capacity)
    ref_v, ref_t, plan = reference_targets_options_f64(A.double().numpy(), nc.tolist(), GAMMA, 0.03,
                                                       flagged_captions, hn_capacity)
    assert np.abs(yv.double().numpy() - ref_v).max() < 2e-3
    assert np.abs(yt.double().numpy() - ref_t).max() < 2e-3
    # The HN column's capacity: k/N of the mass, or one column's share.
    n_cols = (n if flagged_captions == "target" else n - k) + 1
    assert abs(plan[:, n].sum() - (k / n if hn_capacity == "flagged" else 1 / n_cols)) < 1e-4
    if flagged_captions == "negative":
        idx = torch.nonzero(nc).flatten()
        assert (yv[:, idx] == 0).all() and (yt[idx] == 0).all()
    if hn_capacity == "flagged" and flagged_captions == "negative":
        # Balanced capacities: a flagged image's OT mass goes (almost) entirely to its own hardest negative.
        assert (yv[nc, n] > 0.95).all()


def test_no_hn_with_negative_flagged_captions_spreads_over_clean_captions(batch32):
    A, nc = batch32
    n = nc.numel()
    yv, _ = ot_targets(A[:, :n], nc, 0.0, None, use_hn=False, flagged_captions="negative")
    clean = (~nc).float()
    for i in torch.nonzero(nc).flatten():
        assert torch.allclose(yv[i], clean / clean.sum())


def test_stage2_drop_weights_and_detach_match_manual():
    g = torch.Generator().manual_seed(3)
    n, d = 6, 4
    v = unit(torch.randn(n, d, generator=g)).requires_grad_()
    t = unit(v.detach() + 0.4 * torch.randn(n, d, generator=g))
    tn = unit(-0.5 * t + 0.5 * torch.randn(n, d, generator=g)).requires_grad_()
    nc = torch.tensor([False, True, False, False, True, False])
    s, w = 10.0, 0.25
    loss, parts = stage2_loss(v, t, tn, s, nc, GAMMA, TIGHT, flagged_captions="drop", w_flagged=w, w_band=0.0,
                              detach_hn=True)
    A = extended_similarity(v.detach(), t, tn.detach()).double()
    yv, yt = ot_targets(A.float(), nc, GAMMA, TIGHT, flagged_captions="drop")
    keep = [j for j in range(n) if not nc[j]] + [n]
    z = s * A

    def kl(target, logits):
        logp = torch.log_softmax(logits, dim=1)
        return torch.where(target > 0, target * (target.clamp_min(1e-30).log() - logp), torch.zeros_like(logp)).sum(1)

    rows_v = kl(yv.double()[:, keep], z[:, keep])
    wv = torch.tensor([w if f else 1.0 for f in nc.tolist()], dtype=torch.float64)
    rows_t = kl(yt.double()[keep], z.T[keep])
    wt = torch.tensor([1.0] * (len(keep) - 1) + [w], dtype=torch.float64)
    assert abs(float(parts["kl_v2t"]) - float((wv * rows_v).sum() / n)) < 1e-4
    assert abs(float(parts["kl_t2v"]) - float((wt * rows_t).sum() / len(keep))) < 1e-4
    loss.backward()
    assert tn.grad is None or tn.grad.abs().max() == 0  # detach_hn: no gradient into the negated path
    assert v.grad.abs().max() > 0


def test_stage1_detach_t_keeps_captions_out_of_cyc_and_band():
    v, t, tn, nc = noisy_batch(n=16, d=8, n_bad=2, seed=4)
    t = t.clone().requires_grad_()
    tn = tn.clone().requires_grad_()
    loss, _ = stage1_loss(v, t, tn, 10.0, ~nc, w_sig_pos=0.0, w_sig_neg=0.0, detach_t=True)
    loss.backward()
    assert t.grad is None or t.grad.abs().max() == 0
    assert tn.grad.abs().max() > 0
    t.grad = None
    loss2, _ = stage1_loss(v, t, tn, 10.0, ~nc, w_sig_pos=0.0, w_sig_neg=0.0)
    assert torch.allclose(loss, loss2)  # same value, other gradients
    loss2.backward()
    assert t.grad.abs().max() > 0


def test_hand_worked_3x3_targets_with_gamma_one_and_exact_ot():
    """N = 3, pair 2 flagged, A = [S | h]. Exact OT with masks (clean rows: no HN column; the flagged row:
    not its own caption) and marginals 1/3 per image, 1/4 per column. The plan below is optimal: it meets the
    marginals and the mask, and the duals u = (0, .3, .6), w = (.1, -.2, .5, -.55) satisfy u_i + w_j <= 1 - A_ij
    on every allowed cell, with equality on the plan's support (complementary slackness; the support is a
    tree of 6 = 3 + 4 - 1 cells and every other allowed cell is slack, so the optimum is unique). The cost
    (1 - A) / max(1 - A) is a positive multiple of 1 - A: same plan. With gamma = 1 the targets are the plan
    normalised by rows (image -> text) and by columns (text -> image)."""
    A = torch.tensor([[0.9, 0.1, 0.5, 0.0], [0.1, 0.9, 0.2, 0.0], [0.3, 0.4, 0.8, 0.95]])
    nc = torch.tensor([False, False, True])
    plan = [[1 / 6, 0, 1 / 6, 0], [0, 1 / 4, 1 / 12, 0], [1 / 12, 0, 0, 1 / 4]]
    allowed = [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 1]]
    u, w = (0.0, 0.3, 0.6), (0.1, -0.2, 0.5, -0.55)
    for i in range(3):
        assert sum(plan[i]) == pytest.approx(1 / 3)
        for j in range(4):
            cost = 1 - float(A[i, j])
            if not allowed[i][j]:
                assert plan[i][j] == 0
            elif plan[i][j] > 0:
                assert u[i] + w[j] == pytest.approx(cost)
            else:
                assert u[i] + w[j] < cost - 0.1
    for j in range(4):
        assert sum(plan[i][j] for i in range(3)) == pytest.approx(1 / 4)

    yv, yt = ot_targets(A, nc, 1.0, POTEMDSolver())
    want_v = torch.tensor([[0.5, 0, 0.5, 0], [0, 0.75, 0.25, 0], [0.25, 0, 0, 0.75]])
    want_t = torch.tensor([[2 / 3, 0, 1 / 3], [0, 1, 0], [2 / 3, 1 / 3, 0], [0, 0, 1]])
    torch.testing.assert_close(yv, want_v, atol=1e-6, rtol=0)
    torch.testing.assert_close(yt, want_t, atol=1e-6, rtol=0)
    # Entropic OT approaches the exact plan as the regularisation shrinks.
    yv_s, yt_s = ot_targets(A, nc, 1.0, SinkhornSolver(reg=0.005, max_iter=20000, tol=1e-7))
    torch.testing.assert_close(yv_s, want_v, atol=5e-3, rtol=0)
    torch.testing.assert_close(yt_s, want_t, atol=5e-3, rtol=0)
