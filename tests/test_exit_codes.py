"""Exit codes schedulers can trust and one line for a full or read-only disk."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import FAST, ROOT
from ncu.errors import StorageError
from ncu.files import atomic_path, storage_error


def test_a_full_disk_during_an_atomic_write_is_one_line_naming_path_and_free_space(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(StorageError, match=rf"cannot write {target}: No space left on device \(.* free on that disk\)"):
        with atomic_path(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert not list(tmp_path.iterdir())  # neither the target nor the temporary file


def test_torch_zip_writer_failures_are_storage_errors(tmp_path):
    target = tmp_path / "last.ckpt"
    with pytest.raises(StorageError, match=rf"cannot write {target}: the write failed"):
        with atomic_path(target):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4374")
    with pytest.raises(RuntimeError, match="something else"):  # other errors pass through unchanged
        with atomic_path(target):
            raise RuntimeError("something else")


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_read_only_or_forbidden_folders_are_storage_errors(tmp_path, code):
    err = storage_error(OSError(code, os.strerror(code), str(tmp_path / "x")))
    assert isinstance(err, StorageError) and str(tmp_path / "x") in str(err) and os.strerror(code) in str(err)
    assert storage_error(OSError(errno.EINVAL, "bad")) is None


@pytest.mark.slow  # a train.py / evaluate.py subprocess
def test_an_unwritable_data_folder_exits_2_with_one_line(tmp_path):
    # /sys refuses new folders even to root (a read-only folder of a normal disk would not stop root)
    out = subprocess.run([sys.executable, "train.py", *FAST, "paths.data_dir=/sys/ncu_data",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot write /sys/ncu_data" in errors[0] and "free on that disk" in errors[0]
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_failed_pretraining_cache_write_warns_and_the_run_goes_on(make_cfg, monkeypatch, caplog):
    from ncu import run as run_mod

    real = run_mod.copy_atomic

    def full_disk_for_the_cache(src, dst):
        if "pretrained" in str(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        real(src, dst)

    monkeypatch.setattr(run_mod, "copy_atomic", full_disk_for_the_cache)
    cfg = make_cfg("method=clip", "epochs_cap=1", "trainer.limit_val_batches=1")
    metrics, objs = run_mod.train(cfg)
    assert "test/rsum" in metrics and (objs["run_dir"] / "metrics.json").exists()
    assert "pre-training cache not written, the run goes on" in caplog.text and "No space left" in caplog.text


def _stage_of_last(run_dir) -> int | None:
    try:
        return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True).get("ncu_stage_index")
    except Exception:  # noqa: BLE001 - not there yet
        return None


@pytest.mark.slow
def test_sigterm_exits_143_after_the_checkpoint_and_resume_finishes(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "train.py", *FAST, "method=clip", "epochs_cap=4", "pretrain.cache=false",
            f"hydra.run.dir={run_dir}", f"paths.data_dir={tmp_path / 'data'}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _stage_of_last(run_dir) != 0:  # pre-training's first epoch is checkpointed
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, proc.stderr.read()[-3000:]
    assert "stopped by SIGTERM during stage 'pretrain'" in (run_dir / "train.log").read_text()
    assert not (run_dir / "metrics.json").exists() and _stage_of_last(run_dir) == 0
    resumed = subprocess.run([*args, "resume=auto"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "metrics.json").exists()
