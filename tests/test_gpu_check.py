"""scripts/gpu_check.sh: its CPU dry run takes every step of the GPU check at smoke size and reports each."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["environment", "pytest-gpu", "speed-ncu-micro-b16", "sinkhorn", "make-run-job", "paper-shaped"]


@pytest.mark.slow
def test_the_dry_run_takes_every_step_and_writes_the_summary(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == STEPS and all(" rc=0 " in line for line in lines)
    assert "6 steps, 0 failed" in proc.stdout
    log = (tmp_path / "log.txt").read_text()
    assert "ncu_stage2/clip:" in log and "sinkhorn_share:" in log  # the speed ratios the GPU table reports
    run = json.loads((tmp_path / "run_metrics.json").read_text())
    paper = json.loads((tmp_path / "paper_metrics.json").read_text())
    assert "test/rsum" in run and "pretrain/rsum" in run
    assert "test/rsum" in paper and "cost/pretrain_samples" not in paper  # ncu_official only, no pre-training
    assert paper["cost/hn_samples"] > 0 and paper["cost/unlearn_samples"] > 0
    assert "stage1_unlearn.ckpt" in log  # its stage checkpoints were written
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(["bash", "scripts/gpu_check.sh", "--bogus"], cwd=REPO, check=True, capture_output=True)
