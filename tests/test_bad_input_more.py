"""More bad input: unreadable images that empty a split, 16-bit images."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ncu.data.datamodule import PairDataModule
from ncu.data.images import load_image
from ncu.errors import DataError


def test_the_split_size_check_counts_the_pairs_left_after_unreadable_images(tmp_path):
    rows = []
    for i in range(80):
        path = tmp_path / f"{i}.png"
        if i % 3:  # two of every three images do not decode
            path.write_bytes(b"not an image")
        else:
            Image.new("RGB", (8, 8), (i, 0, 0)).save(path)
        rows.append({"image_path": str(path), "caption": f"thing number {i}"})
    table = tmp_path / "pairs.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    data = {"name": "csv", "source": "csv", "path": str(table), "image_key": "image_path", "caption_key": "caption",
            "val_frac": 0.1, "test_frac": 0.2, "max_side": 8}
    dm = PairDataModule(data, {"protocol": "caption", "rate": 0.2, "seed": 0}, batch_size=32,
                        noise_dir=str(tmp_path / "noise"))
    # ~56 training rows pass the first check; a third of them decode, fewer than one batch of 32
    with pytest.raises(DataError, match=rf"^data\.path='{table}': the training split has (\d+) pairs \(\1 kept of "
                                        r"\d+: \d+ dropped because their images are unreadable\), fewer than one "
                                        r"batch \(data\.batch_size=32\)"):
        dm.setup()
    assert not dm.datasets  # a refused setup does not look done: a second call refuses again
    with pytest.raises(DataError, match="fewer than one batch"):
        dm.setup()


def test_shard_evaluation_splits_emptied_by_unreadable_images_are_refused(tmp_path):
    import io
    import tarfile

    shard = tmp_path / "shard-00000.tar"
    with tarfile.open(shard, "w") as tf:
        for i in range(60):
            for name, data in ((f"{i:06d}.png", b"not an image"), (f"{i:06d}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    data = {"name": "wds", "source": "wds", "shards": str(shard), "val_frac": 0.2, "test_frac": 0.2, "max_side": 8}
    dm = PairDataModule(data, {"protocol": "caption", "rate": 0.2, "seed": 0}, batch_size=2,
                        noise_dir=str(tmp_path / "noise"))
    with pytest.raises(DataError, match=r"^data\.shards='.*shard-00000\.tar'.*: the val and test split has fewer than "
                                        r"2 pairs \(0 kept of \d+: \d+ dropped because their images are unreadable\)"):
        dm.setup()
    assert not dm.datasets


@pytest.mark.parametrize("dtype, suffix, mode", [(np.uint16, ".png", "I;16"), (">u2", ".tif", "I;16B"),
                                                (np.int32, ".tif", "I")], ids=["I;16", "I;16B", "I"])
def test_16_bit_images_are_scaled_from_their_range_not_clipped_to_white(tmp_path, dtype, suffix, mode):
    ramp = np.linspace(0, 65535, 64).reshape(8, 8).astype(dtype)
    path = tmp_path / f"ramp{suffix}"
    if mode == "I;16B":
        Image.frombytes(mode, (8, 8), ramp.tobytes()).save(path)
    else:
        Image.fromarray(ramp).save(path)
    with Image.open(path) as im:
        assert im.mode == mode or (mode == "I;16" and im.mode == "I")  # Pillow versions differ on 16-bit PNGs
    got = np.asarray(load_image(path))[..., 0].astype(int)
    want = np.rint(ramp.astype(float) / 257.0).astype(int)
    assert np.abs(got - want).max() <= 1  # convert("RGB") alone gives 255 for every pixel above 255
    assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) == 64


def test_in_memory_16_bit_images_of_a_benchmark_are_scaled_too():
    from ncu.eval.benchmarks import _open

    ramp = np.linspace(0, 65535, 64).reshape(8, 8).astype(np.uint16)
    got = np.asarray(_open(Image.fromarray(ramp)))[..., 0].astype(int)
    assert np.abs(got - np.rint(ramp / 257.0)).max() <= 1 and len(np.unique(got)) == 64


def _no_model(monkeypatch):
    from ncu.eval import suite

    monkeypatch.setattr(suite, "create_bundle", lambda *a: pytest.fail("model loaded before the check"))
    monkeypatch.setattr(suite, "build", lambda *a: pytest.fail("run rebuilt before the check"))
    return suite


@pytest.mark.parametrize("layout", ["empty", "class_without_images", "no_images_at_all"])
def test_a_bad_image_folder_is_one_error_before_the_model_loads(tmp_path, monkeypatch, layout):
    from conftest import compose_cfg
    from ncu.config import ConfigError

    suite = _no_model(monkeypatch)
    folder = tmp_path / "classes"
    folder.mkdir()
    if layout != "empty":
        (folder / "cat").mkdir()
        (folder / "cat" / "notes.txt").write_text("not an image")
    if layout == "class_without_images":
        (folder / "dog").mkdir()
        Image.new("RGB", (8, 8)).save(folder / "dog" / "a.png")
    cfg = compose_cfg(["ckpt_path=pretrained", "model=micro", "benchmark=zeroshot_folder",
                       f"benchmark.tasks.zeroshot.data={folder}"], config_name="evaluate", tmp_path=tmp_path)
    want = (r"has no class sub-folders" if layout == "empty"
            else r"1 of \d class folders hold no image with an extension in .*\['cat'\]")
    with pytest.raises(ConfigError, match=rf"^benchmark\.tasks\.zeroshot\.data: {folder}.*{want}"):
        suite.evaluate(cfg)
    assert not (tmp_path / "run").exists()  # refused before the output folder is made


def _class_folder(root, classes):
    for name in classes:
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "a.png")
    return root


@pytest.mark.parametrize("case", ["empty_test", "class_without_images", "different_classes", "header_only_csv"])
def test_a_bad_linear_probe_folder_is_one_error_before_the_model_loads(tmp_path, monkeypatch, case):
    from conftest import compose_cfg
    from ncu.config import ConfigError

    suite = _no_model(monkeypatch)
    train = _class_folder(tmp_path / "train", ["cat", "dog"])
    test = tmp_path / "test"
    test.mkdir()
    if case == "class_without_images":
        _class_folder(test, ["cat"])
        (test / "dog").mkdir()
    elif case == "different_classes":
        _class_folder(test, ["cat", "cow"])
    elif case == "header_only_csv":
        test = tmp_path / "test.csv"
        test.write_text("image,label\n")
    cfg = compose_cfg(["ckpt_path=pretrained", "model=micro", "benchmark=linear_probe_folder",
                       f"benchmark.tasks.linear_probe.train={train}", f"benchmark.tasks.linear_probe.test={test}"],
                      config_name="evaluate", tmp_path=tmp_path)
    want = {"empty_test": rf"\.test: {test} has no class sub-folders",
            "class_without_images": rf"\.test: {test}: 1 of 2 class folders hold no image .*\['dog'\]",
            "different_classes": r": the train and test folders .* have different class folders, "
                                 r"e.g. \['cow', 'dog'\]",
            "header_only_csv": rf"\.test={test}: the table has a header but no data rows"}[case]
    with pytest.raises(ConfigError, match=rf"^benchmark\.tasks\.linear_probe{want}"):
        suite.evaluate(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # an evaluate.py subprocess
def test_evaluate_py_on_an_empty_image_folder_exits_2_and_leaves_no_folder(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    folder = tmp_path / "empty"
    folder.mkdir()
    out = subprocess.run([sys.executable, "evaluate.py", "ckpt_path=pretrained", "model=micro",
                          "benchmark=zeroshot_folder", f"benchmark.tasks.zeroshot.data={folder}",
                          f"hydra.run.dir={tmp_path / 'eval' / 'x'}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"{folder} has no class sub-folders" in lines[0]
    assert not (tmp_path / "eval").exists()


def test_a_quota_that_flags_nothing_is_warned_at_start(caplog):
    from conftest import compose_cfg
    from ncu.config import validate

    from ncu.config import _warn_once

    _warn_once.cache_clear()
    validate(compose_cfg(["method=filter", "method.nc_ratio=0.001", "data.batch_size=128"]))
    assert "method.nc_ratio=0.001 with data.batch_size=128 flags k = floor(0.001 x 128) = 0" in caplog.text
    assert "finetune flag nothing" in caplog.text
    caplog.clear()
    validate(compose_cfg(["method=filter", "method.nc_ratio=0.01", "data.batch_size=128"]))  # k = 1
    validate(compose_cfg(["method=clip", "method.nc_ratio=0.001"]))  # clip does not act on flags
    validate(compose_cfg(["method=filter", "method.nc_ratio=0.001", "method.detector=oracle"]))
    assert "flags k" not in caplog.text


@pytest.mark.parametrize("override, named", [("+method.gamm=0.5", "method.gamma"),
                                             ("++data.vall_frac=0.2", "data.val_frac"),
                                             ("+method.stages.hn.warmpu=0.1", "method.stages.hn.warmup"),
                                             ("+pretrain.stage.warmpu=0.1", "pretrain.stage.warmup")])
def test_added_keys_that_no_config_defines_are_typos(override, named):
    import re

    from conftest import compose_cfg
    from ncu.config import ConfigError, validate

    key = override.split("=")[0]
    added = re.escape(key.lstrip("+"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: no config under conf/ defines {added} "
                                          rf"\(did you mean {re.escape(named)}\?\); .*OPEN_SECTIONS"):
        validate(compose_cfg([override]))


# Every key the README, the tests, the sweeps and conf/ add with + or ++ (grep -rhoE "\+\+?[a-z_][a-zA-Z0-9_.]*=").
USED_ADDITIONS = ["++data.val_frac=0.2", "++method.stages.hn.warmup=2", "++method.stages.hn.min_lr_ratio=0.1",
                  "+method.stages.extra={objective:clip,epochs:1,lr:1e-4}", "+trainer.detect_anomaly=false",
                  "++method.gamma=0.5"]
EVAL_ADDITIONS = ["+run_overrides.data.limit=384", "+run_overrides.paths.noise_dir=/tmp/x",
                  "+run_overrides.data.n_val=10", "+run_overrides.data.n_train=10", "+run_overrides.data.n_test=10",
                  "+run_overrides.data.n_concepts=8", "+run_overrides.data.max_side=32",
                  "+run_overrides.data.image_size=32", "+run_overrides.data.batch_size=8",
                  "+benchmark.tasks.cifar10={kind:zeroshot_folder,data:/x}"]


@pytest.mark.parametrize("override", USED_ADDITIONS + ["+method.stages.hn.groups.head.params=[prompt.*]",
                                                       "+logger.csv.flush_logs_every_n_steps=10",
                                                       "+hydra.job.env_set.X=1"])
def test_added_keys_that_a_config_defines_or_that_open_sections_take_pass(override):
    from conftest import compose_cfg
    from ncu.config_keys import check_added_keys

    cfg = compose_cfg([override])
    check_added_keys(cfg)  # raises on an unknown key


@pytest.mark.parametrize("override", EVAL_ADDITIONS)
def test_evaluate_added_keys_that_a_config_defines_pass(override):
    from conftest import compose_cfg
    from ncu.config import validate_eval

    validate_eval(compose_cfg(["ckpt_path=pretrained", "model=micro", override], config_name="evaluate"))


def test_added_key_decisions_per_config():
    from ncu.config_keys import unknown_added_key

    for key in ("run_overrides.data.limit", "run_overrides.paths.noise_dir", "run_overrides.data.n_val",
                "run_overrides.method.stages.hn.warmup", "run_overrides.method.stages.new", "benchmark.tasks.cifar10",
                "trainer.detect_anomaly", "callbacks.early_stop", "hydra.job.name", "model.pretrained"):
        assert unknown_added_key(key, "evaluate") is None, key
    for key in ("method.stages.new", "method.stages.hn.clamp_logit_scale", "method.stages.hn.groups.g.lr",
                "optim.stage_defaults.warmup", "solver.max_size", "trainer.anything", "callbacks.x"):
        assert unknown_added_key(key, "train") is None, key
    assert "did you mean run_overrides.data.limit?" in unknown_added_key("run_overrides.data.limt", "evaluate")
    # a train.py key given to evaluate.py belongs under run_overrides; a run has no benchmark tasks
    assert "did you mean run_overrides.method.gamma?" in unknown_added_key("method.gamma", "evaluate")
    assert "did you mean run_overrides.method.stages.hn.warmup?" in unknown_added_key("method.stages.hn.warmup",
                                                                                       "evaluate")
    assert unknown_added_key("benchmark.tasks.cifar10", "train") is not None
    assert unknown_added_key("ckpt_path", "train") is not None
    message = unknown_added_key("method.gamm", "train", "++")
    assert message.startswith("++method.gamm: ") and "did you mean method.gamma?" in message
    assert "(did you mean" not in unknown_added_key("zzzz.qqqq", "train")


def _recorded(task: list[str]) -> None:
    """Hydra's record of a command line, as train.py sees it (group selections cannot all compose here)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from ncu.config import compose_config

    cfg = compose_config([], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.overrides.task = task
    HydraConfig.instance().set_config(cfg)


def test_group_selections_are_not_checked_as_keys():
    from ncu.config import ConfigError
    from ncu.config_keys import check_added_keys

    _recorded(["+experiment=smoke", "+hydra/launcher=slurm", "+hydra/sweeper=optuna", "+data@run_defaults.data=csv",
               "seed=1"])
    check_added_keys()
    _recorded(["+experiment=smoke", "+method.gamm=0.5"])
    with pytest.raises(ConfigError, match=r"^\+method\.gamm: .*did you mean method\.gamma\?"):
        check_added_keys()


def test_a_stale_hydra_record_of_another_composition_is_not_checked():
    from conftest import compose_cfg
    from ncu.config import ConfigError, compose_config, validate

    with pytest.raises(ConfigError, match="method.gamm"):
        validate(compose_cfg(["+method.gamm=0.5"]))
    validate(compose_config(["method=clip"]))  # Hydra's record still names +method.gamm: not this config's


@pytest.mark.slow  # a train.py subprocess
def test_train_py_refuses_an_added_typo_in_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, "train.py", "+method.gamm=0.5", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "+method.gamm" in lines[0] and "did you mean method.gamma?" in lines[0], lines
    assert not (tmp_path / "run").exists()
