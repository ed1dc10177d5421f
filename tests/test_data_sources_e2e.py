"""Exported real pairs (CSV + image files, tar shards; a few corrupt images) through whole training runs."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import ROOT, compose_cfg
from ncu.config import ConfigError, validate
from ncu.data.datamodule import PairDataModule
from ncu.data.stats import DataStatsCallback, loader_throughput
from ncu.data.streams import ShardTrainSet
from ncu.data.embedded import split_of
from ncu.data.export import export
from ncu.run import train

LIMIT, CORRUPT, SHARDS = 200, 3, 4
RUN = ["experiment=smoke", "method=clip", "logger=none", "print_table=false", "noise.protocol=image",
       "noise.rate=0.4", "data.limit=null", "epochs_cap=1"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return export(out, limit=LIMIT, num_shards=SHARDS, corrupt=CORRUPT)


def decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001
        return False


def split_counts(keys) -> dict[str, int]:
    """How many of ``keys`` fall in each split, computed from the key hash as the data config says."""
    splits = [split_of(k, 0.1, 0.2) for k in keys]
    return {s: splits.count(s) for s in ("train", "val", "test")}


@pytest.fixture(scope="module")
def csv_run(exported, tmp_path_factory):
    cfg = compose_cfg(RUN + ["data=csv", f"data.path={exported['csv']}", "data.category_key=category",
                             "data.key_key=key"], tmp_path=tmp_path_factory.mktemp("csv_run"))
    return train(cfg)


@pytest.fixture(scope="module")
def wds_run(exported, tmp_path_factory):
    cfg = compose_cfg(RUN + ["data=wds", f'data.shards="{exported["spec"]}"'],
                      tmp_path=tmp_path_factory.mktemp("wds_run"))
    return train(cfg)


def test_export_writes_the_same_samples_in_both_formats(exported):
    table = pd.read_csv(exported["csv"])
    assert list(table.columns) == ["image_path", "caption", "category", "key"]
    assert len(table) == LIMIT + CORRUPT and table["key"].is_unique
    assert not table["key"].str.contains(r"[:/.]").any()
    members = []
    for shard in exported["shards"]:
        with tarfile.open(shard) as tf:
            members += [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    assert [n for n, _ in members[0::3]] == [f"{k}.png" for k in table["key"]]  # same order in both
    assert [d.decode() for _, d in members[1::3]] == table["caption"].tolist()
    assert [json.loads(d)["category"] for _, d in members[2::3]] == table["category"].tolist()
    base = exported["csv"].parent
    ok = [decodes((base / p).read_bytes()) for p in table["image_path"]]
    assert sorted(table["key"][~np.array(ok)]) == sorted(exported["corrupt_keys"])
    assert len(exported["corrupt_keys"]) == CORRUPT
    assert [d for n, d in members[0::3]] == [(base / p).read_bytes() for p in table["image_path"]]


def test_csv_run_skips_corrupt_files_and_realises_the_noise(exported, csv_run):
    metrics, objects = csv_run
    on_disk = json.loads((objects["run_dir"] / "metrics.json").read_text())
    assert np.isfinite(on_disk["test/rsum"]) and "test/zeroshot_top1" in on_disk
    dm = objects["datamodule"]
    art = dm.noise_artifact
    keys = pd.read_csv(exported["csv"])["key"]
    train_keys = [k for k in keys if split_of(k, 0.1, 0.2) == "train"]
    assert art.keys.tolist() == train_keys  # noise on the training keys, in file order
    # Image protocol: floor(0.4 N) images permuted; a pair is noisy when its caption shows another image.
    n = len(train_keys)
    moved = art.perm != np.arange(n)
    assert moved.sum() <= int(0.4 * n) and on_disk["noise/realised_rate"] == pytest.approx(moved.mean())
    assert on_disk["noise/realised_rate"] >= 0.3
    # A corrupt image drops its own pair and the pair shown with it (train); one pair in val/test.
    bad = np.isin(art.keys, exported["corrupt_keys"])
    counts = split_counts(exported["corrupt_keys"])
    expected = int((bad | bad[art.perm]).sum()) + counts["val"] + counts["test"]
    assert dm.skipped == expected == on_disk["data/skipped"] >= CORRUPT
    stats = dm.stats()
    assert stats["rows"] == LIMIT + CORRUPT and stats["empty_captions"] == 0 and stats["skipped"] == expected


def test_wds_run_streams_the_same_noise_and_counts_corrupt_images(exported, wds_run, csv_run):
    metrics, objects = wds_run
    on_disk = json.loads((objects["run_dir"] / "metrics.json").read_text())
    assert np.isfinite(on_disk["test/rsum"]) and "test/zeroshot_top1" in on_disk
    dm = objects["datamodule"]
    art = dm.noise_artifact
    # Same training keys in the same order as the CSV, same noise seed: the same corruption.
    csv_art = csv_run[1]["datamodule"].noise_artifact
    assert art.keys.tolist() == csv_art.keys.tolist() and (art.perm == csv_art.perm).all()
    assert on_disk["noise/realised_rate"] == pytest.approx(csv_art.noisy_mask.mean())
    # Every corrupt image is decoded once per pass (image protocol: one caption per image), train or not.
    assert dm.skipped == CORRUPT and dm.stats()["skipped"] == CORRUPT
    counts = split_counts(exported["corrupt_keys"])
    assert len(dm.datasets["val"]) + len(dm.datasets["test"]) == (
        sum(split_counts(pd.read_csv(exported["csv"])["key"])[s] for s in ("val", "test"))
        - counts["val"] - counts["test"])
    categories = set(pd.read_csv(exported["csv"])["category"])
    assert set(dm.classnames) <= categories and len(dm.classnames) > 1  # from the .json members


def test_wds_stream_shows_each_caption_with_its_permuted_image(exported, wds_run):
    dm = wds_run[1]["datamodule"]
    art = dm.noise_artifact
    items = list(dm.datasets["train"])
    shown = {it["key"]: it["image_key"] for it in items}
    expected = {k: art.keys[p] for k, p in zip(art.keys, art.perm) if art.keys[p] not in exported["corrupt_keys"]}
    assert len(items) == len(shown) and shown == expected
    assert all(it["noisy"] == (it["key"] != it["image_key"]) for it in items)


def test_shared_counters_over_two_workers_and_loader_throughput(exported, tmp_path):
    data = {"name": "wds", "source": "wds", "shards": exported["spec"], "max_side": 32, "shuffle_buffer": 16}
    dm = PairDataModule(data, {"protocol": "image", "rate": 0.4, "seed": 0}, batch_size=8, num_workers=2,
                        noise_dir=str(tmp_path))
    dm.attach(lambda im: torch.zeros(1), lambda im: torch.zeros(1), None)
    result = loader_throughput(dm, n_batches=10_000)  # one whole pass
    train = dm.datasets["train"]
    assert isinstance(train, ShardTrainSet)
    bad_train = split_counts(exported["corrupt_keys"])["train"]
    assert bad_train > 0  # else the worker counters would go untested
    assert train.skipped == bad_train  # counted in the workers, read in the main process
    assert train.streamed == len(train) - bad_train
    assert result["pairs"] <= train.streamed and result["pairs"] % 8 == 0 and result["pairs_per_s"] > 0


def test_data_stats_callback_logs_skipped_and_throughput(wds_run):
    dm = wds_run[1]["datamodule"]

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

            self.val_batches = 0

        def training_step(self, batch, batch_idx):
            return (self.w - 1).pow(2).sum()

        def validation_step(self, batch, batch_idx):
            self.val_batches += 1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, callbacks=[DataStatsCallback()])
    probe = Probe()
    trainer.fit(probe, datamodule=dm)
    assert probe.val_batches == 1  # the end of the stream ended the epoch, then validation ran
    logged = trainer.callback_metrics
    assert float(logged["data/skipped"]) == CORRUPT
    assert float(logged["data/pairs_per_s"]) > 0 and dm.pairs_per_s == pytest.approx(float(logged["data/pairs_per_s"]))
    assert float(logged["data/train_pairs"]) == len(dm.datasets["train"])


def test_csv_with_a_missing_column_fails_at_start_naming_the_columns(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("img,text\na.png,a cat\n")
    cfg = compose_cfg(RUN + ["data=csv", f"data.path={path}"], tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=r"'image_path'.*columns found: \['img', 'text'\]"):
        validate(cfg)
    cfg = compose_cfg(RUN + ["data=csv", f"data.path={path}", "data.image_key=img", "data.caption_key=caption"],
                      tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=r"'caption' \(data.caption_key\)"):
        validate(cfg)


def test_wds_with_missing_shards_fails_at_start(exported, tmp_path):
    spec = exported["spec"].replace("00003", "00004")  # one shard too many
    cfg = compose_cfg(RUN + ["data=wds", f'data.shards="{spec}"'], tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="1 of 5 shards not found"):
        validate(cfg)
    cfg = compose_cfg(RUN + ["data=wds"], tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="data.shards"):
        validate(cfg)


def _train_cli(*args: str, tmp_path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", "experiment=smoke", "method=clip", "noise.protocol=image", "noise.rate=0.4",
           *args, f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={tmp_path / 'data'}", "logger=none"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["csv", "wds"])
def test_acceptance_command_runs(exported, tmp_path, source):
    arg = f"data.path={exported['csv']}" if source == "csv" else f'data.shards="{exported["spec"]}"'
    proc = _train_cli(f"data={source}", arg, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test/rsum" in json.loads((tmp_path / "run" / "metrics.json").read_text())


@pytest.mark.slow
def test_cli_reports_a_missing_column_on_one_line(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("img,text\na.png,a cat\n")
    proc = _train_cli("data=csv", f"data.path={path}", tmp_path=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "columns found: ['img', 'text']" in errors[0]


def test_a_run_streams_resampled_pipe_shards_from_two_weighted_sources(exported, tmp_path):
    """data=wds with pipe: URLs (what reading from object storage looks like), two sources with weights and
    resampled shards: the run trains on samples_per_epoch pairs per epoch, with the index and noise of the
    local shards."""
    shards = exported["shards"]
    sources = [f"pipe:cat {shards[0]}", "::".join(f"pipe:cat {s}" for s in shards[1:])]
    cfg = compose_cfg(RUN + ["data=wds", f"data.shards={json.dumps(sources)}", "data.resampled=true",
                             "data.samples_per_epoch=96", "data.source_weights=[1,3]"], tmp_path=tmp_path)
    metrics, objects = train(cfg)
    dm = objects["datamodule"]
    assert len(dm.datasets["train"]) == 96 and np.isfinite(metrics["test/rsum"])
    assert metrics["cost/finetune_samples"] == 96 // 64 * 64  # one epoch of whole batches of the 96 pairs
    stream = dm.datasets["train"].pairs
    assert stream.weights.tolist() == pytest.approx([1 / 4] + [3 / 4 / (len(shards) - 1)] * (len(shards) - 1))
    assert stream.shards == [f"pipe:cat {s}" for s in shards]
