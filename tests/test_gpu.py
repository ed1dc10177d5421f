"""CUDA paths (run where a GPU is present; skipped elsewhere): a bf16-mixed NCU step per stage against the
same step in float32, and a whole smoke run with trainer=gpu."""
from __future__ import annotations

import pytest
import torch

from ncu.config import plan_stages
from ncu.run import build, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_mixed_ncu_step_matches_float32(make_cfg):
    cfg = make_cfg("method=ncu", "method.negation.perturb.enabled=false", "data.limit=96", "data.batch_size=32")
    _, dm, module = build(cfg)
    batch = next(iter(dm.train_dataloader()))
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    module = module.cuda()
    for name, stage in plan_stages(cfg):
        if name == "pretrain":
            continue
        module.set_stage(name, stage)
        module.zero_grad(set_to_none=True)
        with torch.no_grad():
            reference = module.training_step(batch, 0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.training_step(batch, 0)
        loss.backward()
        assert loss.dtype == torch.float32  # scores, OT and the losses stay in float32 under autocast
        assert torch.isfinite(loss) and abs(float(loss) - float(reference)) <= 0.05 * abs(float(reference)) + 1e-3
        grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


def test_smoke_run_on_the_gpu(make_cfg):
    metrics, objects = train(make_cfg("method=ncu", "trainer=gpu"))
    assert torch.isfinite(torch.tensor(metrics["test/rsum"])) and "hn/val_rsum" in metrics
    assert objects["trainer"].precision == "bf16-mixed"
