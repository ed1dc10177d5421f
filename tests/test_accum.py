"""optim.accum_freq: K micro-batches give the loss and the parameter gradients of one step on their
concatenation, for every objective that couples the batch (ncu/accum.py's feature cache)."""
from __future__ import annotations

import copy
import random
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from ncu import accum
from ncu.config import plan_stages
from ncu.run import build

CASES = {  # method overrides, stage to run
    "clip": (["method=clip"], "finetune"),
    "filter": (["method=filter"], "finetune"),
    "grad_ascent": (["method=grad_ascent"], "finetune"),
    "ncu_hn": (["method=ncu"], "hn"),
    "ncu_unlearn": (["method=ncu"], "unlearn"),
    "ncu_official_hn": (["method=ncu_official"], "hn"),  # stage 1 through the text tower, not only the prompt
}
K, MICRO = 4, 16


def _slice(batch: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in batch.items()}


def _rng_states(module) -> tuple:
    return (module.perturber.rng.getstate() if module.perturber is not None else None,
            module.template_rng.getstate(), torch.get_rng_state(), random.getstate())


def _set_rng_states(module, states: tuple) -> None:
    if module.perturber is not None:
        module.perturber.rng.setstate(states[0])
    module.template_rng.setstate(states[1])
    torch.set_rng_state(states[2])
    random.setstate(states[3])


def _grads(module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad and p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("objective", list(CASES))
def test_k_micro_batches_give_the_loss_and_gradients_of_one_batch_of_their_concatenation(make_cfg, objective):
    """float64: one step on a batch of K x MICRO pairs against ``accum.accumulated_backward`` of its K slices
    (encoded without gradients, the loss on the cached features, each slice encoded again and
    back-propagated). The caption perturbation of the negated path is on: drawn once per micro-batch and
    reused by its second encoding, it gives the same captions as the one batch."""
    overrides, stage_name = CASES[objective]
    cfg = make_cfg(*overrides, "data.limit=160", f"data.batch_size={K * MICRO}", f"optim.accum_freq={K}")
    _, dm, module = build(cfg)
    module.double()
    batch = next(iter(dm.train_dataloader()))
    batch["image"] = batch["image"].double()
    stage = dict(plan_stages(cfg))[stage_name]
    assert stage["objective"] == objective.replace("_official", "")
    module.set_stage(stage_name, stage)
    states = _rng_states(module)
    memory = copy.deepcopy(module.memory)

    loss = module.batch_loss(module.encode_train(module.train_inputs(batch)), [batch])
    loss.backward()
    want = _grads(module)
    flagged_once = module.last_step[0].flagged.clone()

    _set_rng_states(module, states)
    module.memory = memory
    backward_calls = []

    def backward(surrogate: torch.Tensor, last: bool) -> None:
        backward_calls.append(last)
        surrogate.backward()

    group = []
    for i in range(K):
        micro = _slice(batch, i * MICRO, (i + 1) * MICRO)
        group.append((micro, accum.encode_without_grad(module.encode_train, module.train_inputs(micro), module.device)))
    got_loss = accum.accumulated_backward(module, group, backward)
    got = _grads(module)

    assert backward_calls == [False] * (K - 1) + [True]  # gradients synced across processes once, at the end
    assert torch.equal(module.last_step[0].flagged, flagged_once)  # the quota over the whole batch
    assert 0 < int(flagged_once.sum()) < len(flagged_once)
    torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-10, atol=1e-12)
    assert set(got) == set(want) and want
    if stage_name != "hn":
        assert "model.logit_scale" in want  # the parameter the loss uses directly, outside the encoders
    for name, g in want.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(got[name], g, rtol=1e-8, atol=1e-10 * float(g.abs().max()), msg=name)


def test_the_second_encoding_draws_the_recorded_random_state_and_leaves_the_stream_as_it_was():
    """A forward that draws from torch's generator (dropout) sees the same draws in its second encoding,
    and the generator continues afterwards as if the second encodings had not run."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 6).double()
    drop = torch.nn.Dropout(0.5)
    x = torch.randn(8, 6, dtype=torch.float64)

    def encode(inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"v": drop(layer(inputs))}

    micro = [accum.encode_without_grad(encode, x[i:i + 4], torch.device("cpu")) for i in (0, 4)]
    after_first_pass = torch.get_rng_state()

    def loss_fn(leaves: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        return (torch.cat([leaf["v"] for leaf in leaves]) ** 2).sum()

    loss, grads, direct = accum.loss_and_feature_grads(loss_fn, micro, list(layer.parameters()))
    assert direct == []  # the loss reads only the features
    seen = []

    def backward(surrogate: torch.Tensor, last: bool) -> None:
        surrogate.backward()

    def encode_and_record(inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        out = encode(inputs)
        seen.append(out["v"].detach())
        return out

    accum.backward_micro_batches(encode_and_record, micro, grads, direct, backward, torch.device("cpu"))
    for m, again in zip(micro, seen):
        assert torch.equal(m.features["v"], again)  # the same dropout mask
    assert torch.equal(torch.get_rng_state(), after_first_pass)
    got = [p.grad.clone() for p in layer.parameters()]
    # The reference: the whole batch's loss under the same masks, back-propagated at once.
    layer.zero_grad()
    whole = []
    for m in micro:
        m.state.restore(torch.device("cpu"))
        whole.append(encode(m.inputs))
    ref_loss = loss_fn(whole)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach())
    for g, p in zip(got, layer.parameters()):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-12)


def test_a_fit_with_accum_freq_steps_once_per_k_micro_batches(make_cfg):
    """Trainer fit: floor(batches / K) optimizer steps per epoch (a last partial group is dropped), the
    schedule sized to them, and the samples counted as those of the steps taken."""
    from ncu.run import train

    cfg = make_cfg("method=clip", "pretrain.enabled=false", "data.batch_size=32", "optim.accum_freq=5",
                   "method.stages.finetune.epochs=2")
    metrics, objects = train(cfg)
    trainer, dm = objects["trainer"], objects["datamodule"]
    batches = len(dm.datasets["train"]) // 32
    steps = 2 * (batches // 5)
    assert batches % 5 and steps > 0  # a partial group exists and is dropped
    assert trainer.global_step == steps
    assert metrics["cost/finetune_samples"] == steps * 5 * 32
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == steps and scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_lightnings_accumulation_is_refused_at_start_naming_optim_accum_freq(tmp_path):
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "train.py", "experiment=smoke", "trainer.accumulate_grad_batches=2",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and time.perf_counter() - start < 10
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "optim.accum_freq=2" in lines[0] and "trainer.accumulate_grad_batches" in lines[0]
