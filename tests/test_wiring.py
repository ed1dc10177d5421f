"""The Lightning module's wiring: training_step's loss equals the pure objective on the module's own
features, flags and logit scale; the baselines' losses equal float64 loops written from their definitions."""
from __future__ import annotations

import math

import pytest
import torch

from ncu.config import plan_stages
from ncu.objectives import baselines
from ncu.objectives import ncu as ncu_obj
from ncu.run import build


def _log_softmax_row(logits: list[float], i: int) -> float:
    m = max(logits)
    return logits[i] - (m + math.log(sum(math.exp(x - m) for x in logits)))


def _infonce_f64(v: torch.Tensor, t: torch.Tensor, s: float, rows: list[int]) -> list[float]:
    """Per-pair symmetric InfoNCE of the pairs ``rows`` against the candidates ``rows`` (float64 loops)."""
    v, t = v.double().tolist(), t.double().tolist()
    dot = [[sum(a * b for a, b in zip(v[i], t[j])) * s for j in rows] for i in rows]
    out = []
    for k in range(len(rows)):
        i2t = -_log_softmax_row(dot[k], k)
        t2i = -_log_softmax_row([dot[r][k] for r in range(len(rows))], k)
        out.append(0.5 * (i2t + t2i))
    return out


@pytest.fixture
def features():
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(10, 6, generator=g), dim=1)
    t = torch.nn.functional.normalize(v + 0.8 * torch.randn(10, 6, generator=g), dim=1)
    flagged = torch.tensor([1, 0, 0, 1, 0, 0, 0, 1, 0, 0], dtype=torch.bool)
    return v, t, torch.tensor(7.5), flagged


def test_filter_loss_is_infonce_over_the_unflagged_pairs_only(features):
    v, t, s, flagged = features
    keep = [i for i in range(10) if not flagged[i]]
    want = sum(_infonce_f64(v, t, float(s), keep)) / len(keep)
    assert float(baselines.filter_loss(v, t, s, flagged)) == pytest.approx(want, rel=1e-5)
    assert float(baselines.clip_loss(v, t, s)) == pytest.approx(sum(_infonce_f64(v, t, float(s), list(range(10)))) / 10,
                                                                rel=1e-5)


@pytest.mark.parametrize("bound", [None, 1.0])
def test_grad_ascent_loss_descends_on_clean_and_ascends_bounded_on_flagged(features, bound):
    v, t, s, flagged = features
    per_pair = _infonce_f64(v, t, float(s), list(range(10)))
    cap = math.log(10) if bound is None else bound
    clean = [per_pair[i] for i in range(10) if not flagged[i]]
    bad = [min(per_pair[i], cap) for i in range(10) if flagged[i]]
    want = sum(clean) / len(clean) - 0.5 * sum(bad) / len(bad)
    got = baselines.grad_ascent_loss(v, t, s, flagged, ascent_weight=0.5, bound=bound)
    assert float(got) == pytest.approx(want, rel=1e-5)


CASES = {  # method overrides, stage to run, objective
    "clip": (["method=clip"], "finetune"),
    "filter": (["method=filter"], "finetune"),
    "grad_ascent": (["method=grad_ascent"], "finetune"),
    "ncu_hn": (["method=ncu", "method.negation.perturb.enabled=false"], "hn"),
    "ncu_unlearn": (["method=ncu", "method.negation.perturb.enabled=false"], "unlearn"),
}


@pytest.mark.parametrize("objective", list(CASES))
def test_training_step_loss_is_the_pure_objective_on_the_modules_own_features(make_cfg, objective):
    overrides, stage_name = CASES[objective]
    cfg = make_cfg(*overrides, "data.limit=96", "data.batch_size=32")
    _, dm, module = build(cfg)
    batch = next(iter(dm.train_dataloader()))
    stage = dict(plan_stages(cfg))[stage_name]
    assert stage["objective"] == objective
    module.set_stage(stage_name, stage)
    module.eval()  # the same forward twice (no dropout); gradients are not needed here
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        # The reference: features, scale and flags recomputed here, then the pure function of the objective.
        v = module.model.encode_image(batch["image"], normalize=True)
        t = module.model.encode_text(batch["text"], normalize=True)
        s = module.model.logit_scale.exp()
        flagged = ncu_obj.select_nc(ncu_obj.nc_scores(v, t, s), cfg.method.nc_ratio)
        assert 0 < int(flagged.sum()) < len(flagged)
        m = module.method
        if objective == "clip":
            want = baselines.clip_loss(v, t, s)
        elif objective == "filter":
            want = baselines.filter_loss(v, t, s, flagged)
        elif objective == "grad_ascent":
            want = baselines.grad_ascent_loss(v, t, s, flagged, m["grad_ascent"]["weight"], m["grad_ascent"]["bound"])
        else:
            tn = module.negated_features(batch["caption"], t, perturb=False)
            if objective == "ncu_hn":
                w = m["stage1"]
                want, _ = ncu_obj.stage1_loss(v, t, tn, s, ~flagged, w["w_cyc"], w["w_band"], w["w_sig_pos"],
                                              w["w_sig_neg"], tuple(m["band"]), detach_t=w["detach_t"])
            else:
                u = m["unlearn"]
                want, _ = ncu_obj.stage2_loss(v, t, tn, s, flagged, m["gamma"], module.solver, use_hn=True,
                                              normalize_t2v=u["normalize_t2v"], reuse_transpose=u["reuse_transpose"],
                                              w_band=u["w_band"], band=tuple(m["band"]),
                                              flagged_captions=u["flagged_captions"], hn_capacity=u["hn_capacity"],
                                              w_flagged=u["w_flagged"], detach_hn=u["detach_hn"])
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_a_new_objective_is_one_registry_entry_and_one_method_setting(make_cfg):
    """A toy objective registered here (not in the product): the config accepts it, the stage resolves it once
    and the step returns its loss on the module's own features, with its options read from the method."""
    from ncu import objectives
    from ncu.config import validate

    def align(b: objectives.Batch, weight: float) -> tuple[torch.Tensor, dict]:
        gap = (b.v - b.t).pow(2).sum(1).mean()
        return weight * gap, {"gap": gap.detach()}

    objectives.register(objectives.Objective("toy_align", align, lambda m, solver: {"weight": m["gamma"]}))
    try:
        cfg = make_cfg("method=ncu", "method.stages.unlearn.objective=toy_align", "data.limit=96",
                       "data.batch_size=32")
        validate(cfg)
        _, dm, module = build(cfg)
        module.set_stage("unlearn", dict(plan_stages(cfg))["unlearn"])
        assert module.objective.name == "toy_align" and module.objective_options == {"weight": cfg.method.gamma}
        batch = next(iter(dm.train_dataloader()))
        loss = module.training_step(batch, 0)
        module.eval()  # the same forward (the towers have no dropout), without building a graph twice
        v = module.model.encode_image(batch["image"], normalize=True)
        t = module.model.encode_text(batch["text"], normalize=True)
        assert float(loss.detach()) == pytest.approx(cfg.method.gamma * float((v - t).pow(2).sum(1).mean()), rel=1e-5)
        loss.backward()
        assert module.model.text_projection.grad.abs().sum() > 0
    finally:
        objectives.REGISTRY.pop("toy_align", None)
