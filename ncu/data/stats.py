"""What a run logs about its data (pairs per second, unreadable images, split counts) and the loader
throughput benchmark."""
from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from ncu.data.datamodule import PairDataModule
from ncu.data.streams import ShardTrainSet


def batch_size_of(batch: Any) -> int:
    if isinstance(batch, dict):
        return len(batch["caption"])
    return len(batch)


class DataStatsCallback(L.Callback):
    """Logs at every training epoch end:

    - ``data/pairs_per_s``: training pairs per second of wall time from the epoch start to the end of its
      last training batch, summed over ranks. End to end: it includes the model's forward/backward, so it
      is a lower bound on the loader's own rate (``loader_throughput`` measures that alone).
    - ``data/skipped``: unreadable images (``PairDataModule.skipped``; the stream part summed over ranks).
    - ``data/<count>``: the other counts of ``PairDataModule.stats()`` (pairs per split, CSV caption counts,
      shard index counts).
    """

    def __init__(self) -> None:
        self._pairs, self._t0, self._t1 = 0, 0.0, 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pairs, self._t0 = 0, time.perf_counter()
        self._t1 = self._t0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._pairs += batch_size_of(batch)
        self._t1 = time.perf_counter()

    def _sum_over_ranks(self, trainer: L.Trainer, pl_module: L.LightningModule, value: float) -> float:
        total = trainer.strategy.reduce(torch.tensor(float(value), device=pl_module.device), reduce_op="sum")
        return float(total)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = self._t1 - self._t0
        rate = self._sum_over_ranks(trainer, pl_module, self._pairs / seconds if seconds > 0 else 0.0)
        values = {"data/pairs_per_s": rate}
        dm = trainer.datamodule
        if isinstance(dm, PairDataModule):
            dm.pairs_per_s = rate
            stats = dm.stats()
            train = dm.datasets.get("train")
            if isinstance(train, ShardTrainSet):  # each rank streams its own shards
                stream = self._sum_over_ranks(trainer, pl_module, train.skipped)
                stats["skipped"] = float(dm.skipped - train.skipped) + stream
            values.update({f"data/{k}": v for k, v in stats.items() if k != "pairs_per_s"})
        for name, value in values.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False, batch_size=1)


def throughput(loader: Any, max_batches: int | None = None) -> dict[str, float]:
    """Pairs per second delivered by ``loader`` (all workers together) over ``max_batches`` batches or one
    pass, whichever ends first, including starting the worker processes."""
    pairs, batches, t0 = 0, 0, time.perf_counter()
    for batch in loader:
        pairs += batch_size_of(batch)
        batches += 1
        if max_batches is not None and batches >= max_batches:
            break
    seconds = time.perf_counter() - t0
    return {"pairs": float(pairs), "batches": float(batches), "seconds": seconds,
            "pairs_per_s": pairs / seconds if seconds > 0 else 0.0}


def loader_throughput(dm: PairDataModule, n_batches: int = 20) -> dict[str, float]:
    """Pure loader speed of ``dm.train_dataloader()`` (decoding, transform, tokenisation and collation; no
    model), see :func:`throughput`. For the in-memory sources the images were decoded in ``setup``: time
    that separately."""
    dm.setup()
    return throughput(dm.train_dataloader(), n_batches)
