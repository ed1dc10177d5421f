"""A point refused at start fails alone: the sweep runs the others, exits 2 naming it, and the report lists
it with the planned points that never launched."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from ncu import report


def _job(root: Path, name: str, overrides: list[str], metrics: dict | None = None, error: str | None = None) -> None:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (job / "error.txt").write_text(error + "\n")


def _plan(root: Path, task: list[str], params: dict | None = None) -> None:
    sweeper = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": params}
    import yaml

    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": sweeper,
                                                                  "overrides": {"task": task}}}))


def test_planned_points_are_the_product_of_the_sweeps(tmp_path):
    _plan(tmp_path, ["experiment=smoke", "noise.rate=0.2,0.4", "print_table=false"], {"method": "clip,ncu"})
    points = report.planned_points(tmp_path / "multirun.yaml")
    assert sorted((p["method"], p["noise.rate"]) for p in points) == [("clip", 0.2), ("clip", 0.4), ("ncu", 0.2),
                                                                      ("ncu", 0.4)]
    assert all(p["experiment"] == "smoke" and p["print_table"] is False for p in points)


def test_report_names_refused_and_never_launched_points(tmp_path, capsys):
    _plan(tmp_path, ["noise.rate=0.2,1.5,0.3,0.4"])
    _job(tmp_path, "0_noise.rate=0.2", ["noise.rate=0.2"], {"test/rsum": 100.0})
    _job(tmp_path, "1_noise.rate=1.5", ["noise.rate=1.5"], error="noise.rate=1.5 is invalid")
    _job(tmp_path, "2_noise.rate=0.3", ["noise.rate=0.3"])  # crashed: no metrics, no error.txt
    df = report.collect(tmp_path)
    assert df.attrs["failed"] == [f"{tmp_path / '1_noise.rate=1.5'}: noise.rate=1.5 is invalid"]
    assert df.attrs["missing"] == [str(tmp_path / "2_noise.rate=0.3")]
    assert df.attrs["unlaunched"] == [f"{tmp_path}: noise.rate=0.4"]
    written = report.write_report(tmp_path, plots=False)
    header = written["md"].read_text().splitlines()[0]
    assert "1 job(s) read, 1 missing" in header and "1 refused, 1 never launched" in header
    err = capsys.readouterr().err
    assert "refused at start" in err and "noise.rate=1.5 is invalid" in err and "never launched" in err


def test_a_sweep_of_another_sweeper_has_no_plan(tmp_path):
    (tmp_path / "multirun.yaml").write_text("hydra:\n  sweeper:\n    _target_: hydra_plugins.optuna.OptunaSweeper\n")
    assert report.planned_points(tmp_path / "multirun.yaml") is None


@pytest.mark.slow
def test_a_refused_point_fails_alone_and_the_sweep_exits_2_naming_it(tmp_path):
    sweep = tmp_path / "sw"
    out = subprocess.run([sys.executable, "train.py", "-m", "experiment=smoke", "noise.rate=0.2,1.5,0.3",
                          "epochs_cap=1", "logger=none", "print_table=false", f"hydra.sweep.dir={sweep}",
                          f"paths.data_dir={tmp_path / 'data'}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    assert sorted(p.parent.name.split("_")[0] for p in sweep.glob("*/metrics.json")) == ["0", "2"]
    assert "noise.rate=1.5: noise.rate=1.5 is invalid" in out.stderr and "Traceback" not in out.stderr
    rep = subprocess.run([sys.executable, "-m", "ncu.report", str(sweep), "--no-plots"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    assert "refused at start" in rep.stderr and "noise.rate=1.5 is invalid" in rep.stderr
    assert "2 job(s) read" in rep.stdout and "1 refused" in rep.stdout
