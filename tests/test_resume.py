"""Kill a run during its second stage; resume=auto finishes it with the numbers of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT

# hn gets 3 epochs so that the kill, after its first epoch's checkpoint, lands inside the stage.
ARGS = ["experiment=smoke", "method=ncu", "epochs_cap=3", "method.stages.hn.epochs=3", "pretrain.cache=false",
        "logger=csv", "print_table=false"]
KEYS = ("test/rsum", "test/zeroshot_top1", "pretrain/rsum", "test/i2t_R@1", "test/t2i_R@10")


def _run(run_dir: Path, data_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "train.py", *ARGS, f"hydra.run.dir={run_dir}", f"paths.data_dir={data_dir}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _stage_of_last(run_dir: Path) -> int | None:
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        return torch.load(last, map_location="cpu", weights_only=False).get("ncu_stage_index")
    except Exception:  # noqa: BLE001 - not there yet
        return None


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2], ids=["in_hn", "in_unlearn"])
def test_sigkill_inside_a_stage_then_resume_matches_uninterrupted(tmp_path, stage):
    reference = _run(tmp_path / "ref", tmp_path / "data_ref")
    victim = _run(tmp_path / "run", tmp_path / "data")
    deadline = time.time() + 300
    while _stage_of_last(tmp_path / "run") != stage:  # an epoch of that stage (hn, unlearn) is checkpointed
        assert victim.poll() is None, victim.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "run" / "metrics.json").exists()
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress["completed"] == ["pretrain", "hn"][:stage]
    killed_at = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert killed_at["ncu_stage_index"] == stage and killed_at["epoch"] < 2  # an epoch of it is still to run

    resumed = _run(tmp_path / "run", tmp_path / "data", "resume=auto")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    log = (tmp_path / "run" / "train.log").read_text()
    assert "resumed from" in log and log.count("stage 1/3: pretrain (clip") == 1  # pre-training not redone
    got = json.loads((tmp_path / "run" / "metrics.json").read_text())
    want = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    for key in KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
