"""Kill -9 inside an epoch (checkpoint.every_n_steps); resume=auto continues that epoch where it stopped (the
same batches, in order, with the same random crops) and ends with the uninterrupted run's numbers."""
import json
import os
import signal
import time

import pytest
import torch

from test_resume import KEYS, _run

EVERY = ["checkpoint.every_n_steps=2"]  # smoke epochs have 6 batches: checkpoints at steps 2 and 4 of each


def _last(run_dir) -> dict | None:
    try:
        return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - not there yet, or being replaced
        return None


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2], ids=["in_pretrain", "in_unlearn"])
def test_sigkill_inside_an_epoch_then_resume_matches_uninterrupted(tmp_path, stage):
    reference = _run(tmp_path / "ref", tmp_path / "data_ref", *EVERY)
    victim = _run(tmp_path / "run", tmp_path / "data", *EVERY)
    deadline = time.time() + 300
    while True:  # the first checkpoint taken inside an epoch of that stage
        ckpt = _last(tmp_path / "run")
        if ckpt is not None and ckpt.get("ncu_stage_index") == stage and "ncu_loader" in ckpt:
            break
        assert victim.poll() is None, victim.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = _last(tmp_path / "run")
    position = killed_at["ncu_loader"]  # the next save at this interval is also inside the epoch
    assert killed_at["ncu_stage_index"] == stage and 0 < position["batches"] < 6
    assert position["skip"] == position["batches"] * 64

    resumed = _run(tmp_path / "run", tmp_path / "data", *EVERY, "resume=auto")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    assert "resumed from" in (tmp_path / "run" / "train.log").read_text()
    got = json.loads((tmp_path / "run" / "metrics.json").read_text())
    want = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    for key in KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    for key in ("cost/pretrain_samples", "cost/unlearn_samples"):
        assert got[key] == want[key], key  # the resumed epoch trained only its remaining batches
