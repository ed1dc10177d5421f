"""Bad input gets one line naming the problem, before work is done; stored artifacts are checked on reuse."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, compose_cfg
from ncu.config import ConfigError, validate
from ncu.data import noise as noise_lib
from ncu.errors import ArtifactError, DataError
from test_wds import sample_members, write_tar


# ------------------------------------------------------------------------------------------ start-up checks
@pytest.mark.parametrize("override, key", [
    ("solver.reg=0", "solver.reg"), ("solver.reg=-0.1", "solver.reg"), ("solver.max_iter=0", "solver.max_iter"),
    ("solver.tol=0", "solver.tol"), ("noise.rate=1.5", "noise.rate"), ("noise.protocol=swap", "noise.protocol"),
    ("noise.seed=0.5", "noise.seed"), ("method.detector=gmmx", "method.detector"),
    ("method.gamma=2", "method.gamma"), ("method.band=[0.2,-0.5]", "method.band"),
    ("method.negation.anchor_cos=1.0", "anchor_cos"), ("method.stage1.w_cyc=-1", "w_cyc"),
    ("method.unlearn.w_flagged=-1", "w_flagged"), ("method.stages.unlearn.lr=0", "lr"),
    ("method.stages.hn.epochs=0", "epochs"), ("++method.stages.hn.warmup=2.5", "warmup"),
    ("++method.stages.hn.min_lr_ratio=2", "min_lr_ratio"), ("data.eval_batch_size=0", "data.eval_batch_size"),
    ("++data.val_frac=1.0", "val_frac"), ("model.name=ViT-Q-99", "model.name"), ("seed=1.5", "seed"),
])
def test_every_value_is_checked_at_start_with_its_key_named(override, key):
    cfg = compose_cfg([override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_the_defaults_and_the_shipped_methods_pass():
    for method in ("clip", "filter", "grad_ascent", "ncu", "ncu_official", "ncu_no_hn", "ncu_no_ot",
                   "ncu_stage2_only", "ncu_template", "pretrain_only"):
        validate(compose_cfg([f"method={method}"]))
    for solver in ("sinkhorn", "pot_sinkhorn", "pot_emd"):
        validate(compose_cfg([f"solver={solver}"]))


@pytest.mark.slow
def test_the_light_model_list_is_open_clips():
    # In a fresh process: other tests register extra architectures in this one.
    code = ("import open_clip; from ncu.models.factory import register_configs; from ncu.config import "
            "known_model_names; register_configs(); assert known_model_names() == set(open_clip.list_models())")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_validation_imports_nothing_heavy():
    code = ("import sys; from ncu.config import compose_config, validate; validate(compose_config(['data=csv', "
            f"'data.path={ROOT / 'README.md'}', 'data.caption_key=x'])) if False else "
            "validate(compose_config([])); heavy = {'torch', 'open_clip', 'lightning'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def _train_py(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_train_py_exits_2_with_one_line_and_leaves_no_run_folder(tmp_path):
    header_only = tmp_path / "pairs.csv"
    header_only.write_text("image_path,caption\n")
    for args, named in ((["solver.reg=0"], "solver.reg"), (["noise.rate=1.5"], "noise.rate"),
                        (["data=csv", f"data.path={header_only}"], "no data rows"),
                        (["data=csv"], "data.path is not set")):
        run_dir = tmp_path / "runs" / named.replace(" ", "_")
        out = _train_py(*args, f"hydra.run.dir={run_dir}")
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0], out.stderr
        assert not run_dir.exists() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------- CSV
def test_csv_bytes_that_are_not_utf8_are_replaced_and_counted(tmp_path):
    from ncu.data.sources import read_pairs_csv

    path = tmp_path / "pairs.csv"
    path.write_bytes(b"image_path,caption\na.png,caf\xe9 on a table\nb.png,a dog\n")
    frame, stats = read_pairs_csv(path)
    assert stats["bad_text"] == 1 and stats["kept"] == 2
    assert frame["caption"].tolist() == ["caf\ufffd on a table", "a dog"]


def _csv_dm(tmp_path, rows: int, batch_size: int):
    from ncu.data.datamodule import PairDataModule

    path = tmp_path / "pairs.csv"
    pd.DataFrame({"image_path": [f"{i}.png" for i in range(rows)],
                  "caption": [f"caption {i}" for i in range(rows)]}).to_csv(path, index=False)
    data = {"source": "csv", "path": str(path), "image_key": "image_path", "caption_key": "caption"}
    return PairDataModule(data, {"protocol": "caption", "rate": 0.2, "seed": 0}, batch_size=batch_size,
                          noise_dir=str(tmp_path / "noise"))


def test_a_split_smaller_than_a_batch_is_refused_before_any_noise_artifact(tmp_path):
    dm = _csv_dm(tmp_path, rows=40, batch_size=64)
    with pytest.raises(DataError, match=r"training split has \d+ pairs, fewer than one batch \(data.batch_size=64\)"):
        dm.setup()
    assert not (tmp_path / "noise").exists()
    with pytest.raises(DataError, match="fewer than 2 pairs"):
        _csv_dm(tmp_path, rows=3, batch_size=2).setup()


# ------------------------------------------------------------------------------------------ noise artifacts
def _artifact(tmp_path, n: int = 50):
    keys = [f"k{i}" for i in range(n)]
    art, folder, reused = noise_lib.build_or_load(tmp_path, "ds", keys, None, 0.4, seed=1)
    assert not reused
    return keys, art, folder


def _reload(tmp_path, keys):
    return noise_lib.build_or_load(tmp_path, "ds", keys, None, 0.4, seed=1)


def test_an_untouched_artifact_is_reused(tmp_path):
    keys, art, _ = _artifact(tmp_path)
    again, _, reused = _reload(tmp_path, keys)
    assert reused and (again.perm == art.perm).all() and set(again.meta["sha256"]) == set(noise_lib.ARTIFACT_FILES)


@pytest.mark.parametrize("hashes", [True, False], ids=["recorded_hash", "legacy_without_hash"])
@pytest.mark.parametrize("tamper, problem", [
    ("identity_perm", "perm.npy"), ("truncated_perm", "perm.npy"), ("half_perm", "perm.npy"),
    ("flipped_mask", "noisy_mask.npy"), ("truncated_meta", "meta.json"), ("other_keys", "keys.npy"),
])
def test_a_changed_or_broken_artifact_is_refused_naming_its_folder(tmp_path, tamper, problem, hashes):
    keys, art, folder = _artifact(tmp_path)
    if not hashes:
        meta = json.loads((folder / "meta.json").read_text())
        del meta["sha256"]
        (folder / "meta.json").write_text(json.dumps(meta))
    n = len(keys)
    if tamper == "identity_perm":  # a valid permutation, but not the one recorded: trains on clean pairs
        np.save(folder / "perm.npy", np.arange(n))
    elif tamper == "truncated_perm":
        data = (folder / "perm.npy").read_bytes()
        (folder / "perm.npy").write_bytes(data[:40])
    elif tamper == "half_perm":
        np.save(folder / "perm.npy", art.perm[: n // 2])
    elif tamper == "flipped_mask":
        mask = art.noisy_mask.copy()
        mask[0] = ~mask[0]
        np.save(folder / "noisy_mask.npy", mask)
    elif tamper == "truncated_meta":
        text = (folder / "meta.json").read_text()
        (folder / "meta.json").write_text(text[: len(text) // 2])
    elif tamper == "other_keys":
        np.save(folder / "keys.npy", np.asarray([f"z{i}" for i in range(n)]))
    with pytest.raises(ArtifactError) as info:
        _reload(tmp_path, keys)
    message = str(info.value)
    assert str(folder) in message and problem in message and "rm -r" in message and "\n" not in message


# ------------------------------------------------------------------------------------------------ shards
def test_a_shard_cut_at_a_member_boundary_is_counted_and_named(tmp_path, caplog):
    from ncu.data.shard_index import build_index

    members = [m for i in range(8) for m in sample_members(i, f"{i:06d}")]
    whole = write_tar(tmp_path / "whole.tar", members).read_bytes()
    # Cut where a member's header starts: tarfile alone reads this as a complete, shorter archive.
    offsets = []
    import tarfile

    with tarfile.open(tmp_path / "whole.tar") as tf:
        offsets = [m.offset for m in tf.getmembers()]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: offsets[8]])  # 4 whole samples (2 members each)
    good = write_tar(tmp_path / "good.tar", [m for i in range(8, 10) for m in sample_members(i, f"{i:06d}")])
    with caplog.at_level(logging.WARNING, logger="ncu.data.wds"):
        index = build_index([str(cut), str(good)])
    assert index.attrs["stats"]["bad_shards"] == 1
    assert len(index) == 3 + 2  # the sample before the cut may be incomplete: not kept
    assert any(str(cut) in r.getMessage() and "after 3 samples" in r.getMessage() for r in caplog.records)


def test_an_unreadable_index_cache_is_rebuilt(tmp_path, caplog):
    from ncu.data.shard_index import build_index

    shard = write_tar(tmp_path / "s.tar", [m for i in range(4) for m in sample_members(i, f"{i:06d}")])
    cache = tmp_path / "index.npz"
    build_index([str(shard)], cache_path=cache)
    cache.write_bytes(cache.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="ncu.data.shard_index"):
        index = build_index([str(shard)], cache_path=cache)
    assert len(index) == 4 and any("unreadable" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------- resume config
def test_resume_refuses_a_folder_made_by_another_config_and_names_the_keys(tmp_path):
    from ncu import resume

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    resume.record(compose_cfg(["experiment=smoke"]), run_dir)
    (run_dir / "progress.json").write_text(json.dumps({"completed": ["pretrain"], "metrics": {}, "step": 3}))
    with pytest.raises(ConfigError, match=r"noise\.rate, seed differ"):
        resume.start(compose_cfg(["experiment=smoke", "noise.rate=0.2", "seed=7", "resume=auto"]), run_dir)
    # what does not change results may differ
    progress = resume.start(compose_cfg(["experiment=smoke", "resume=auto", "logger=none", "trainer.devices=1",
                                         "data.num_workers=1"]), run_dir)
    assert progress["completed"] == ["pretrain"] and progress["step"] == 3
