"""model.grad_checkpointing and model.compile: memory and speed switches that leave the step's numbers as
they are."""
from __future__ import annotations

import copy

import pytest
import torch

from ncu.config import plan_stages
from ncu.models import factory
from ncu.run import build


def _step(module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _module_and_batch(make_cfg, *overrides: str, stage_name: str):
    off = ["method.negation.perturb.enabled=false"] if any(o.startswith("method=ncu") for o in overrides) else []
    cfg = make_cfg(*overrides, *off, "data.limit=96", "data.batch_size=32")
    _, dm, module = build(cfg)
    module.set_stage(stage_name, dict(plan_stages(cfg))[stage_name])
    return module, next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("method, stage_name", [("clip", "finetune"), ("ncu", "unlearn"), ("ncu_official", "hn")])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(make_cfg, method, stage_name):
    """float64: activations recomputed in the backward pass (both towers, and the negated path through the
    text transformer) give the plain step's loss and every gradient."""
    module, batch = _module_and_batch(make_cfg, f"method={method}", stage_name=stage_name)
    module.double()
    batch["image"] = batch["image"].double()
    plain = _step(module, batch)
    checkpointed = copy.deepcopy(module)
    factory.speed_switches(checkpointed.model, grad_checkpointing=True, compile=False)
    assert checkpointed.model.visual.transformer.grad_checkpointing and checkpointed.model.transformer.grad_checkpointing
    loss, grads = _step(checkpointed, batch)
    torch.testing.assert_close(loss, plain[0], rtol=1e-12, atol=1e-12)
    assert set(grads) == set(plain[1]) and grads
    for name, g in plain[1].items():
        torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.slow
def test_a_compiled_step_runs_on_cpu_and_matches_the_plain_step(make_cfg):
    """model.compile: each tower's forward compiled in place (the parameter names, and so the checkpoints,
    unchanged); one NCU stage-2 step gives the plain step's loss and gradients to float32 rounding."""
    module, batch = _module_and_batch(make_cfg, "method=ncu", stage_name="unlearn")
    names = [n for n, _ in module.named_parameters()]
    plain = _step(module, batch)
    compiled = copy.deepcopy(module)
    factory.speed_switches(compiled.model, grad_checkpointing=False, compile=True)
    assert [n for n, _ in compiled.named_parameters()] == names
    assert set(compiled.state_dict()) == set(module.state_dict())
    loss, grads = _step(compiled, batch)
    torch.testing.assert_close(loss, plain[0], rtol=1e-4, atol=1e-5)
    for name, g in plain[1].items():
        torch.testing.assert_close(grads[name], g, rtol=1e-3, atol=1e-4 * float(g.abs().max()), msg=name)
