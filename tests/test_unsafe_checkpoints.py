"""No checkpoint runs code when it is loaded: every path reads with ``torch.load(weights_only=True)``.

Each test writes a checkpoint carrying a harmless payload (unpickling it would create a marker file) into one
of the places a run reads checkpoints from, and checks the file is refused and the marker never written.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, ROOT, compose_cfg
from ncu.errors import CheckpointError


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_payload_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hyper_parameters": {"config": {"model": {"name": "ncu-micro"}}},
                "ncu_stage_index": 0, "payload": Payload(marker)}, path)
    assert not marker.exists()
    return path


def test_the_payload_runs_when_loaded_unsafely(tmp_path):
    """The fixture is a real payload: without weights_only it writes the marker (so the tests below can fail)."""
    marker = tmp_path / "marker"
    torch.load(write_payload_checkpoint(tmp_path / "x.ckpt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"], ids=["ours", "open_clip_file"])
def test_unsafe_model_pretrained_is_refused_naming_the_opt_in(tmp_path, suffix):
    from ncu.models import factory

    marker = tmp_path / "marker"
    path = write_payload_checkpoint(tmp_path / f"weights{suffix}", marker)
    with pytest.raises(CheckpointError, match=r"weights\S* holds Python objects .*\((builtins|io)\.open\)") as err:
        factory.create("ncu-micro", str(path))
    assert "trust_checkpoints=true" in str(err.value)
    assert not marker.exists()


def test_unsafe_payload_in_the_pretraining_cache_is_not_run_and_pretraining_runs_again(tmp_path, caplog):
    from ncu.lit_module import CLIPUnlearner
    from ncu.models import factory
    from ncu.run import load_cached_pretrain

    marker = tmp_path / "marker"
    cache = write_payload_checkpoint(tmp_path / "data" / "pretrained" / "key.ckpt", marker)
    bundle = factory.create("ncu-micro")
    method = dict(compose_cfg(["method=clip"]).method)
    module = CLIPUnlearner(bundle.model, bundle.tokenizer, method, {"accum_freq": 1}, config={"model": {"name": "ncu-micro"},
                                                                            "seed": 0})
    assert load_cached_pretrain(module, cache) is False
    assert "pre-training cache unusable" in caplog.text and "trust_checkpoints" in caplog.text
    assert not marker.exists()


@pytest.mark.slow  # a train.py / evaluate.py subprocess
def test_unsafe_last_ckpt_is_refused_by_resume_auto(tmp_path):
    """train.py resume=auto on a run folder whose last.ckpt carries a payload: exit 2, one line, not run."""
    marker = tmp_path / "marker"
    run_dir = tmp_path / "run"
    write_payload_checkpoint(run_dir / "checkpoints" / "last.ckpt", marker)
    (run_dir / "progress.json").write_text(json.dumps({"completed": [], "metrics": {}, "step": 0}))
    out = subprocess.run([sys.executable, "train.py", *FAST, "resume=auto", "pretrain.cache=false",
                          f"hydra.run.dir={run_dir}", f"paths.data_dir={tmp_path / 'data'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "last.ckpt holds Python objects" in lines[0] and "trust_checkpoints" in lines[0]
    assert "Traceback" not in out.stderr
    assert not marker.exists()


@pytest.mark.slow  # a train.py / evaluate.py subprocess
def test_unsafe_checkpoint_given_to_evaluate_py_is_refused(tmp_path):
    marker = tmp_path / "marker"
    ckpt = write_payload_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", marker)
    out = subprocess.run([sys.executable, "evaluate.py", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds Python objects" in lines[0] and "trust_checkpoints=true" in lines[0], lines
    assert not marker.exists() and not (tmp_path / "eval").exists()


def test_trust_checkpoints_is_the_explicit_opt_in(tmp_path):
    """With trust_checkpoints=true the same file is read (so the payload runs: the user vouched for it)."""
    from ncu.models import factory

    marker = tmp_path / "marker"
    ckpt = factory.read_checkpoint(write_payload_checkpoint(tmp_path / "x.ckpt", marker), trusted=True)
    assert marker.exists() and ckpt["ncu_stage_index"] == 0
    assert compose_cfg([]).trust_checkpoints is False  # off by default
    assert compose_cfg([], config_name="evaluate").trust_checkpoints is False
