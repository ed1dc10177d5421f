"""One run per folder: a lock while a run is in it; a resume continues only from checkpoints its own config
wrote; a copied or moved folder resumes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import FAST, ROOT, compose_cfg
from ncu.cli import lock_run_folder
from ncu.config import ConfigError
from ncu.resume import changed_keys


def test_a_second_lock_on_a_run_folder_names_the_holder(tmp_path):
    fd = lock_run_folder(tmp_path / "run")
    try:
        with pytest.raises(ConfigError, match=rf"{tmp_path / 'run'} is in use by another run \(pid \d+ on .*\)"):
            lock_run_folder(tmp_path / "run")
    finally:
        os.close(fd)
    os.close(lock_run_folder(tmp_path / "run"))  # free again once the holder is gone


def test_train_py_in_a_folder_in_use_exits_2_before_writing_there(tmp_path):
    run_dir = tmp_path / "run"
    fd = lock_run_folder(run_dir)
    try:
        out = subprocess.run([sys.executable, "train.py", *FAST, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    finally:
        os.close(fd)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{run_dir} is in use by another run (pid {os.getpid()}" in lines[0], lines
    assert not (run_dir / ".hydra").exists()  # the first run's Hydra record is not overwritten


def test_paths_that_only_locate_the_folder_may_differ_on_resume():
    a = json.loads(json.dumps({"trainer": {"default_root_dir": "/a/run", "max_epochs": 3}, "paths": {"x": "/a"}}))
    b = {"trainer": {"default_root_dir": "/b/run", "max_epochs": 3}, "paths": {"x": "/b"}}
    assert changed_keys(a, b) == []
    b["trainer"]["max_epochs"] = 4
    assert changed_keys(a, b) == ["trainer.max_epochs"]


@pytest.mark.slow
def test_resume_refuses_another_configs_checkpoint_and_a_moved_folder_resumes(tmp_path):
    from ncu.run import train

    data = tmp_path / "data"
    first = compose_cfg([*FAST, "method=clip", "epochs_cap=1", "pretrain.cache=false"], tmp_path=tmp_path / "a",
                        data_dir=data)
    metrics, objs = train(first)
    run_a = objs["run_dir"]

    # Moved: another folder, the same config: every stage is done, the test reruns with the same numbers.
    moved = tmp_path / "b" / "run"
    shutil.copytree(run_a, moved)
    again = compose_cfg([*FAST, "method=clip", "epochs_cap=1", "pretrain.cache=false", "resume=auto"],
                        tmp_path=tmp_path / "b", data_dir=data)
    resumed, _ = train(again)
    assert resumed["test/rsum"] == pytest.approx(metrics["test/rsum"])

    # Another config wrote run_config.json last (two runs in one folder): the stage checkpoints are compared.
    other = compose_cfg([*FAST, "method=clip", "epochs_cap=1", "pretrain.cache=false", "resume=auto",
                         "noise.rate=0.2"], tmp_path=tmp_path / "b", data_dir=data)
    from ncu import resume

    resume.record(other, moved)
    (moved / "progress.json").write_text(json.dumps({"completed": ["pretrain"], "metrics": {}, "step": 0}))
    with pytest.raises(ConfigError, match=r"stage0_pretrain\.ckpt was written with another config \(noise\.rate"):
        train(other)
