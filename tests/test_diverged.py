"""A diverged run stops with one line naming the stage, the step and the learning rate; a non-finite model is
never checkpointed as a stage result, cached or evaluated."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import FAST, ROOT
from ncu.config import plan_stages
from ncu.errors import DivergedError
from ncu.run import build, load_cached_pretrain, refuse_diverged

STAGES = {"clip": (["method=clip"], "finetune"),
          "ncu_unlearn": (["method=ncu", "method.negation.perturb.enabled=false"], "unlearn")}


@pytest.fixture
def small_run(make_cfg):
    def _make(objective: str):
        overrides, stage_name = STAGES[objective]
        cfg = make_cfg(*overrides, "data.limit=96", "data.batch_size=32")
        _, dm, module = build(cfg)
        module.set_stage(stage_name, dict(plan_stages(cfg))[stage_name])
        return module, next(iter(dm.train_dataloader()))

    return _make


@pytest.mark.parametrize("objective", list(STAGES))
def test_a_non_finite_model_stops_the_step_naming_stage_and_lr_key(small_run, objective):
    module, batch = small_run(objective)
    with torch.no_grad():
        module.model.visual.proj.fill_(float("nan")) if module.model.visual.proj is not None else None
    with pytest.raises(DivergedError, match=rf"stage '{STAGES[objective][1]}' diverged at step 0 \(lr .*\): the "
                                            rf"pair scores .* not finite; lower method\.stages\.{STAGES[objective][1]}\.lr"):
        module.training_step(batch, 0)  # not OT's "cost must be finite" ValueError from deep inside


def test_an_infinite_logit_scale_gives_a_non_finite_loss_and_stops(small_run):
    module, batch = small_run("clip")
    with torch.no_grad():
        module.model.logit_scale.fill_(1e4)  # exp overflows to inf: scores NaN
    with pytest.raises(DivergedError, match="not finite"):
        module.training_step(batch, 0)


def test_non_finite_features_are_never_evaluated(small_run):
    module, _ = small_run("clip")
    v = torch.full((4, 8), float("nan"))
    module._eval_feats = [(v, torch.ones(4, 8), torch.arange(4))]
    with pytest.raises(DivergedError, match=r"val features are not finite .* not evaluated"):
        module._eval_end("val", "val")


def test_a_stage_that_ends_with_non_finite_weights_is_refused(small_run):
    module, _ = small_run("clip")
    refuse_diverged(module, "finetune")  # finite: nothing to say
    with torch.no_grad():
        next(module.model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(DivergedError, match=r"stage 'finetune' ended with non-finite weights \(1 tensors"):
        refuse_diverged(module, "finetune")


def test_a_cached_pretraining_with_non_finite_weights_is_pre_trained_again(small_run, tmp_path, caplog):
    module, _ = small_run("clip")
    state = {f"model.{k}": torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in module.model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "cache.ckpt")
    assert load_cached_pretrain(module, tmp_path / "cache.ckpt") is False
    assert "non-finite weights" in caplog.text


@pytest.mark.slow  # a train.py / evaluate.py subprocess
def test_a_diverged_pretraining_exits_with_one_line_and_caches_nothing(tmp_path):
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    out = subprocess.run([sys.executable, "train.py", *FAST, "pretrain.stage.lr=1e5", f"hydra.run.dir={run_dir}",
                          f"paths.data_dir={data_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stage 'pretrain' diverged" in errors[0] and "pretrain.stage.lr" in errors[0]
    assert "Traceback" not in out.stderr
    assert not (data_dir / "pretrained").exists() or not any((data_dir / "pretrained").iterdir())
    assert not list(run_dir.glob("checkpoints/stage*.ckpt")) and not (run_dir / "metrics.json").exists()
