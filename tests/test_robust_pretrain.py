"""pretrain=robust (a dataset-level detector filters from the start, after an InfoNCE warm-up) and the cost metrics."""
import pytest
import torch

from conftest import compose_cfg


def test_robust_pretraining_composes_its_own_detector_over_the_methods():
    from ncu.config import plan_stages

    cfg = compose_cfg(["pretrain=robust", "method=ncu"])
    stage = dict(plan_stages(cfg))["pretrain"]
    assert (stage["objective"], stage["detector"], stage["flag_after"], stage["epochs"]) == ("filter", "ema", 2, 16)
    assert cfg.method.detector == "batch"  # the method's stages keep theirs
    default = dict(plan_stages(compose_cfg([])))["pretrain"]
    own = ("objective", "detector", "flag_after", "detection")
    # the default pre-training has no flagging of its own (optim.stage_defaults: the neutral values)
    assert default["objective"] == "clip" and (default["detector"], default["flag_after"], default["detection"]) == (
        None, 0, {})
    assert {k: v for k, v in stage.items() if k not in own} == {k: v for k, v in default.items() if k not in own}


def test_a_capped_stage_keeps_a_share_of_warm_up_and_one_epoch_that_acts():
    from ncu.config import plan_stages

    stage = dict(plan_stages(compose_cfg(["pretrain=robust", "epochs_cap=2"])))["pretrain"]
    assert (stage["epochs"], stage["flag_after"]) == (2, 1)
    stage = dict(plan_stages(compose_cfg(["pretrain=robust", "epochs_cap=8"])))["pretrain"]
    assert (stage["epochs"], stage["flag_after"]) == (8, 1)


@pytest.mark.parametrize("override, message", [
    ("pretrain.stage.flag_after=16", "flag_after=16 warm-up epochs leave none of its 16 epochs"),
    ("pretrain.stage.detector=vote", "stage 'pretrain': detector='vote' is unknown"),
    ("pretrain.stage.flag_after=-1", "flag_after"),
])
def test_bad_robust_settings_are_refused_at_start(override, message):
    from ncu.config import ConfigError, validate

    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg(["pretrain=robust", override]))


def test_nothing_is_flagged_during_the_warm_up():
    from ncu.config import plan_stages
    from ncu.lit_module import CLIPUnlearner
    from ncu.models.factory import create

    bundle = create("ncu-micro", None)
    method = dict(compose_cfg(["method=clip"]).method)
    module = CLIPUnlearner(bundle.model, bundle.tokenizer, method, {"lr": 1e-3, "accum_freq": 1}, config={"seed": 0})
    scores, noisy = torch.rand(8), torch.tensor([1, 0, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    stage = dict(plan_stages(compose_cfg(["pretrain=robust"])))["pretrain"]
    module.set_stage("pretrain", {**stage, "objective": "filter", "detector": "oracle", "flag_after": 1})
    assert module.detector == "oracle" and module.warming_up()  # epoch 0 of a 1-epoch warm-up
    assert not module.flag(scores, noisy)[0].any()
    module.set_stage("pretrain", {**stage, "objective": "filter", "detector": "oracle", "flag_after": 0})
    assert torch.equal(module.flag(scores, noisy)[0], noisy)


@pytest.mark.slow
def test_robust_pretraining_runs_filters_and_counts_its_cost(tmp_path):
    from ncu.run import train

    overrides = ["pretrain=robust", "method=pretrain_only", "experiment=smoke", "logger=none", "print_table=false",
                 "data.shifts=[]", "epochs_cap=3"]
    metrics, objects = train(compose_cfg(overrides, tmp_path=tmp_path))
    n_train = len(objects["datamodule"].datasets["train"])
    assert metrics["cost/pretrain_cached"] == 0.0
    assert metrics["cost/pretrain_samples"] == 3 * (n_train // 64) * 64  # 3 epochs of whole batches
    assert 0 < metrics["cost/pretrain_seconds"] == metrics["cost/total_seconds"]
    assert "train/nc_rate_est" in metrics  # the ema detector's mixture acted in the last epoch
    assert 0 < metrics["train/nc_precision"] <= 1
    # The cache returns the pre-training with what it cost when it ran.
    again, _ = train(compose_cfg(overrides, tmp_path=tmp_path / "again", data_dir=tmp_path / "data"))
    assert again["cost/pretrain_cached"] == 1.0
    assert again["cost/pretrain_samples"] == metrics["cost/pretrain_samples"]
    assert again["cost/pretrain_seconds"] == pytest.approx(metrics["cost/pretrain_seconds"])
    assert again["test/rsum"] == metrics["test/rsum"]
