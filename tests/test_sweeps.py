"""A real 2x2 multirun in a subprocess, then the results table over it."""
import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT


@pytest.mark.slow
def test_smoke_multirun_then_report(tmp_path):
    sweep = tmp_path / "sw"
    cmd = [sys.executable, "train.py", "-m", "experiment=smoke", "noise.rate=0.2,0.4", "method=clip,ncu",
           "epochs_cap=1", "trainer.limit_val_batches=1", "print_table=false", f"hydra.sweep.dir={sweep}",
           f"paths.data_dir={tmp_path / 'data'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent.name for p in sweep.glob("*/metrics.json"))
    assert len(jobs) == 4 and all("method=" in j and "noise.rate=" in j for j in jobs)
    # one pre-training per noise rate: the clip and ncu jobs of a rate share it
    assert len(list((tmp_path / "data" / "pretrained").glob("*.ckpt"))) == 2

    rep = subprocess.run([sys.executable, "-m", "ncu.report", str(sweep)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    table = pd.read_csv(sweep / "results.csv")
    assert sorted(zip(table["method"], table["noise.rate"])) == [("clip", 0.2), ("clip", 0.4), ("ncu", 0.2),
                                                                ("ncu", 0.4)]
    assert (table["n"] == 1).all() and "test/rsum_mean" in table.columns
    assert (sweep / "results.md").read_text().count("| clip |") == 2
    pngs = list(sweep.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
