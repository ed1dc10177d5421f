"""A rehearsal of the paper's path before spending GPU days: the embedded pairs exported as img2dataset-style
shards (tars + parquet tables), experiment=paper_cc3m on 2 CPU processes (DDP, gloo) with a micro model and
a few batches, then evaluate.py benchmark=paper on small ImageNet-folder / retrieval-CSV fixtures."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def _run(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_paper_preset_runs_every_stage_on_shards_under_ddp_then_the_paper_benchmark(tmp_path):
    from ncu.data.export import export

    exported = export(tmp_path / "export", limit=600, num_shards=4)
    assert all(p.with_suffix(".parquet").exists() for p in exported["shards"])
    run = tmp_path / "run"
    _run("train.py", "experiment=paper_cc3m", "model=micro", "trainer=ddp_cpu", "trainer.precision=32-true",
         "debug=limit", f'data.shards="{exported["spec"]}"', f"data.index_cache={tmp_path / 'index.npz'}",
         "data.batch_size=16", "data.eval_batch_size=64", "data.num_workers=0", "data.val_frac=0.1",
         "data.test_frac=0.2", "data.shuffle_buffer=0", f"hydra.run.dir={run}", f"paths.data_dir={tmp_path / 'data'}",
         "logger=csv", "print_table=false", "trainer.enable_progress_bar=false")
    metrics = json.loads((run / "metrics.json").read_text())
    assert json.loads((run / "progress.json").read_text())["completed"] == ["hn", "unlearn"]
    for key in ("test/rsum", "pretrain/rsum", "hn/val_rsum", "unlearn/val_rsum", "train/nc_precision"):
        assert key in metrics, key
    assert metrics["data/parquet_shards"] == 4 and metrics["data/bad_shards"] == 0

    # The paper's benchmark on fixtures in its formats: an ImageNet-V2-style folder (class index folders)
    # and Karpathy-style retrieval CSVs, all from the exported images.
    pairs = pd.read_csv(exported["csv"]).head(20)
    folder = tmp_path / "imagenet"
    for i, row in pairs.head(6).iterrows():
        target = folder / str(i % 3) / f"{i}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((exported["csv"].parent / row["image_path"]).read_bytes())
    retrieval = tmp_path / "test.csv"
    pd.DataFrame({"filepath": [str(exported["csv"].parent / p) for p in pairs["image_path"]],
                  "caption": pairs["caption"]}).to_csv(retrieval, index=False)
    _run("evaluate.py", f"ckpt_path={run / 'checkpoints' / 'stage1_unlearn.ckpt'}", "benchmark=paper",
         "benchmark.tasks.imagenet.templates=laclip", f"benchmark.tasks.imagenet.data={folder}",
         f"benchmark.tasks.flickr30k.csv={retrieval}", f"benchmark.tasks.mscoco.csv={retrieval}",
         "benchmark.tasks.mscoco.coco_fold_size=10", "print_table=false")
    written = sorted((run / "eval").glob("*/metrics.json"))
    assert len(written) == 1
    evaluated = json.loads(written[0].read_text())
    assert any(k.startswith("eval/imagenet/") for k in evaluated)
    assert any(k.startswith("eval/flickr30k/") for k in evaluated)
    assert any(k.startswith("eval/mscoco/") for k in evaluated)
