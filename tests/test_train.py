import json
import tempfile

import pytest
import torch

from conftest import compose_cfg
from ncu.eval.suite import evaluate
from ncu.run import train

KEYS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum", "zeroshot_top1"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    cfg = compose_cfg(["experiment=smoke", "method=clip", "logger=csv", "print_table=false"], tmp_path=tmp)
    metrics, objects = train(cfg)
    return cfg, metrics, objects


def test_smoke_run_writes_metrics_checkpoints_and_logs(smoke_run):
    cfg, metrics, objects = smoke_run
    run_dir = objects["run_dir"]
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == pytest.approx(metrics)
    # Recalls count hits over the test pairs, zero-shot accuracy over the zero-shot images: each value is a
    # multiple of 100 / (their number), and recall grows with K.
    n_test = len(objects["datamodule"].datasets["test"])
    n_zs = len(objects["datamodule"].datasets["zeroshot"])
    for prefix in ("test", "pretrain"):
        for key in KEYS:
            value, n = on_disk[f"{prefix}/{key}"], n_zs if key == "zeroshot_top1" else n_test
            if key != "rsum":
                assert 0.0 <= value <= 100.0 and value * n / 100 == pytest.approx(round(value * n / 100)), key
        for d in ("i2t", "t2i"):
            assert on_disk[f"{prefix}/{d}_R@1"] <= on_disk[f"{prefix}/{d}_R@5"] <= on_disk[f"{prefix}/{d}_R@10"]
    assert on_disk["test/rsum"] == pytest.approx(sum(on_disk[f"test/{k}"] for k in KEYS[:6]))
    assert "train/nc_auroc" in on_disk and 0.35 <= on_disk["noise/realised_rate"] <= 0.4
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    # Each stage's result, and the best epoch by val/rsum of each stage fitted here (checkpoint.best).
    best = ["stage1_finetune_best.ckpt"] + ([] if on_disk["cost/pretrain_cached"] else ["stage0_pretrain_best.ckpt"])
    assert ckpts == sorted(["last.ckpt", "stage0_pretrain.ckpt", "stage1_finetune.ckpt", *best])
    best_ckpt = torch.load(run_dir / "checkpoints" / "stage1_finetune_best.ckpt", weights_only=True)
    result = torch.load(run_dir / "checkpoints" / "stage1_finetune.ckpt", weights_only=True)
    assert "optimizer_states" not in best_ckpt and set(best_ckpt["state_dict"]) == set(result["state_dict"])
    assert best_ckpt["hyper_parameters"]["config"] == result["hyper_parameters"]["config"]  # evaluate.py rebuilds
    # The shifted styles (data.shifts): each scored before and after, over the pairs it draws.
    shifts = objects["datamodule"].shifts
    assert {"openmoji", "sketch"} <= set(shifts)
    for style, sets in shifts.items():
        n_zs = len(sets["zeroshot"])
        assert on_disk[f"shift/{style}/test_pairs"] == len(sets["test"]) > 0
        for prefix in ("test", "pretrain"):
            assert 0 <= on_disk[f"{prefix}/{style}/rsum"] <= 600
            zs = on_disk[f"{prefix}/{style}/zeroshot_top1"]
            assert zs * n_zs / 100 == pytest.approx(round(zs * n_zs / 100))
    # Compute per stage and in all: whole batches of the training split each epoch.
    n_train = len(objects["datamodule"].datasets["train"])
    for stage in ("pretrain", "finetune"):
        epochs = 2  # experiment=smoke caps every stage at 2 epochs
        assert on_disk[f"cost/{stage}_samples"] == epochs * (n_train // 64) * 64
        assert on_disk[f"cost/{stage}_seconds"] > 0
    assert on_disk["cost/total_samples"] == on_disk["cost/pretrain_samples"] + on_disk["cost/finetune_samples"]
    csv = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    header = csv[0].split(",")
    assert {"train/loss", "val/rsum", "test/rsum", "pretrain/rsum"} <= set(header)
    steps = [int(row.split(",")[header.index("step")]) for row in csv[1:] if row.split(",")[header.index("step")]]
    # The step keeps counting across stages (each stage's trainer counts from 0): one rising x-axis for the
    # run, ending at the optimizer steps of the stages fitted here.
    progress = json.loads((run_dir / "progress.json").read_text())
    fitted = 2 - int(on_disk["cost/pretrain_cached"])
    assert progress["step"] == fitted * 2 * (n_train // 64)
    assert steps == sorted(steps) and steps[-1] == progress["step"] and len(set(steps)) > 4
    meta = json.loads((run_dir / "noise_meta.json").read_text())
    assert meta["rate"] == cfg.noise.rate and meta["seed"] == cfg.noise.seed


def test_evaluate_reproduces_the_run_test_metrics(smoke_run, tmp_path):
    _, metrics, objects = smoke_run
    ckpt = objects["run_dir"] / "checkpoints" / "stage1_finetune.ckpt"
    cfg = compose_cfg([f"ckpt_path={ckpt}"], config_name="evaluate", tmp_path=tmp_path)
    evaluated, _ = evaluate(cfg)
    for key in KEYS:
        assert evaluated[f"test/{key}"] == pytest.approx(metrics[f"test/{key}"], abs=1e-6)
    assert (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_pretrained_checkpoint_starts_another_run_without_pretraining(smoke_run, tmp_path):
    _, metrics, objects = smoke_run
    ckpt = objects["run_dir"] / "checkpoints" / "stage0_pretrain.ckpt"
    cfg = compose_cfg(["experiment=smoke", "method=clip", "logger=none", "print_table=false", f"model.pretrained={ckpt}"],
                      tmp_path=tmp_path)
    second, objects2 = train(cfg)
    assert sorted(p.name for p in (objects2["run_dir"] / "checkpoints").glob("stage*")) == [
        "stage0_finetune.ckpt", "stage0_finetune_best.ckpt"]
    # "before" is the loaded pre-trained model: the same numbers as the first run's pre-trained model
    assert second["pretrain/rsum"] == pytest.approx(metrics["pretrain/rsum"], abs=1e-6)


@pytest.mark.slow
def test_same_config_same_numbers_on_cpu(smoke_run, tmp_path):
    cfg, metrics, _ = smoke_run
    again = compose_cfg(["experiment=smoke", "method=clip", "logger=none", "print_table=false"], tmp_path=tmp_path)
    metrics2, _ = train(again)
    for key in ("test/rsum", "pretrain/rsum", "test/zeroshot_top1", "train/loss"):
        assert metrics2[key] == pytest.approx(metrics[key], abs=1e-5), key


@pytest.mark.slow
def test_cached_pretraining_is_reused_with_the_same_numbers(smoke_run, tmp_path):
    cfg, metrics, objects = smoke_run
    cached = sorted((objects["run_dir"].parent / "data" / "pretrained").glob("*.ckpt"))
    assert len(cached) == 1
    again = compose_cfg(["experiment=smoke", "method=clip", "logger=none", "print_table=false"], tmp_path=tmp_path,
                        data_dir=objects["run_dir"].parent / "data")
    metrics2, objects2 = train(again)
    stage0 = objects2["run_dir"] / "checkpoints" / "stage0_pretrain.ckpt"
    assert stage0.read_bytes() == cached[0].read_bytes()  # loaded, not trained again
    for key in ("test/rsum", "pretrain/rsum", "test/zeroshot_top1"):
        assert metrics2[key] == pytest.approx(metrics[key], abs=1e-5), key
    # a different pre-training recipe is another cache entry
    other = compose_cfg(["experiment=smoke", "method=clip", "logger=none", "print_table=false", "pretrain.stage.lr=0.002",
                         "trainer.limit_train_batches=1"], tmp_path=tmp_path / "o", data_dir=objects["run_dir"].parent / "data")
    train(other)
    assert len(list((objects["run_dir"].parent / "data" / "pretrained").glob("*.ckpt"))) == 2


@pytest.mark.slow
def test_wandb_offline_run_logs_config_group_and_dashboard_images(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cfg = compose_cfg(["experiment=smoke", "method=ncu", "logger=wandb", "print_table=false", "epochs_cap=1",
                       "trainer.limit_val_batches=1"], tmp_path=tmp_path)
    metrics, objects = train(cfg)
    import wandb

    assert wandb.run is None  # finished
    run_dir = objects["run_dir"]
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    files = [p for p in (run_dir / "wandb").rglob("*") if p.is_file()]
    assert any(run_id in str(p) for p in files)
    media = [p.name for p in files if p.suffix == ".png"]
    assert any("nc_score_hist" in m for m in media) and any("ot_targets" in m for m in media)
    assert any("retrieval_examples" in p.name for p in files)
    assert not list(scratch.glob("ncu-dash-*"))  # the images' scratch dir goes with the run
    record = next(p for p in files if p.suffix == ".wandb").read_bytes()
    # the full resolved config (with the Hydra choices), the experiment as group, the config choices as tags
    for needle in (b"hydra_choices", b"realised_rate", b"smoke", b"rate0.4", b"ncu-micro"):
        assert needle in record, needle


def test_lightning_lines_reach_the_console_once_under_a_root_handler():
    import logging

    from ncu.run import single_log_stream

    root_handler = logging.NullHandler()
    logging.getLogger().addHandler(root_handler)
    try:
        single_log_stream()
        chain, logger = [], logging.getLogger("lightning.pytorch.utilities.rank_zero")
        while logger is not None:
            chain += [(logger.name, h) for h in logger.handlers]
            logger = logger.parent if logger.propagate else None
        assert chain and all(name == "root" for name, _ in chain), chain
    finally:
        logging.getLogger().removeHandler(root_handler)


def test_lightning_product_tips_are_dropped_and_other_lines_kept(caplog):
    import logging

    from lightning.pytorch.utilities import rank_zero_info

    from ncu.run import single_log_stream

    single_log_stream()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing litlogger")
        rank_zero_info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_pretraining_cache_is_keyed_on_the_data_present_not_only_the_data_config(make_cfg, tmp_path):
    # Same data config, but the optional TuxPaint stamps absent: other pairs, so another pre-training.
    import pandas as pd

    from ncu.data.datamodule import PairDataModule
    from ncu.stages import pretrain_cache_path

    cfg = make_cfg("data=embedded")
    dm = PairDataModule(dict(cfg.data), dict(cfg.noise), noise_dir=str(tmp_path / "noise"))
    both = pd.DataFrame({"key": ["twemoji:1f600", "tuxpaint:animals/cat"]})
    twemoji_only = pd.DataFrame({"key": ["twemoji:1f600"]})
    stage = {"epochs": 1}
    a = pretrain_cache_path(cfg, stage, dm.dataset_id(both))
    b = pretrain_cache_path(cfg, stage, dm.dataset_id(twemoji_only))
    assert a != b and a.parent == b.parent
    assert a == pretrain_cache_path(cfg, stage, dm.dataset_id(both.iloc[::-1]))  # not the row order


def test_resume_into_a_finished_run_with_another_config_is_refused(smoke_run):
    from ncu.config import ConfigError

    cfg, metrics, objects = smoke_run
    run_dir = objects["run_dir"]
    before = {name: (run_dir / name).read_bytes() for name in ("metrics.json", "noise_meta.json", "progress.json")}
    other = compose_cfg(["experiment=smoke", "method=clip", "logger=csv", "print_table=false", "noise.rate=0.2",
                         "resume=auto"], tmp_path=run_dir.parent)
    with pytest.raises(ConfigError, match=r"noise\.rate differ"):
        train(other)
    assert {name: (run_dir / name).read_bytes() for name in before} == before  # nothing rewritten
    # the same config (logging may differ) finds every stage done and keeps the run's numbers, train/* included
    same = compose_cfg(["experiment=smoke", "method=clip", "logger=none", "print_table=false", "resume=auto"],
                       tmp_path=run_dir.parent)
    again, _ = train(same)
    for key in ("test/rsum", "pretrain/rsum", "train/loss", "val/rsum", "noise/realised_rate"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_a_checkpoint_of_another_architecture_or_truncated_is_named(smoke_run, tmp_path):
    from ncu.errors import CheckpointError
    from ncu.models import factory
    from ncu.run import load_cached_pretrain

    cfg, _, objects = smoke_run
    ckpt = objects["run_dir"] / "checkpoints" / "stage0_pretrain.ckpt"
    with pytest.raises(CheckpointError) as info:
        factory.create("ncu-tiny", str(ckpt))
    message = str(info.value)
    assert str(ckpt) in message and "'ncu-tiny'" in message and f"model.name={cfg.model.name!r}" in message
    assert "tensors of another shape" in message and "\n" not in message
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"checkpoint {cut} is not readable"):
        factory.create(cfg.model.name, str(cut))
    # a pre-training cache file that does not load is reported and pre-training runs again
    assert load_cached_pretrain(objects["module"], cut) is False


def test_evaluate_py_on_a_missing_or_truncated_checkpoint_exits_2_and_leaves_no_folder(smoke_run, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    from ncu.errors import CheckpointError

    missing = tmp_path / "gone" / "checkpoints" / "last.ckpt"
    cut = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    cut.parent.mkdir(parents=True)
    cut.write_bytes((smoke_run[2]["run_dir"] / "checkpoints" / "stage0_pretrain.ckpt").read_bytes()[:1000])
    out = subprocess.run([sys.executable, "evaluate.py", f"ckpt_path={missing}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and str(missing) in lines[0] and "file not found" in lines[0]
    assert not (tmp_path / "gone").exists()
    with pytest.raises(CheckpointError, match=f"checkpoint {cut} is not readable"):
        evaluate(compose_cfg([f"ckpt_path={cut}"], config_name="evaluate", tmp_path=tmp_path))
