"""The training stream of a shard source: an iterable dataset that counts across loader workers, and the
loader that starts each pass at the next epoch."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


class ShardTrainSet(IterableDataset):
    """The training stream of a shard source: a ``ShardPairs`` over the training keys (noise applied), with

    - ``len()``: the pairs of one epoch (all ranks): the training pairs, as ``len(PairDataset)``, or a resampled
      stream's ``samples_per_epoch``; ``rows``: the training pairs (the index rows sample indices point to);
    - ``skipped`` / ``streamed``: undecodable images and pairs read in the current pass, summed over the
      loader workers. Each worker writes its counts into a shared-memory tensor (one row per worker)
      because a worker's own copy of the dataset is invisible to the main process.
    """

    def __init__(self, pairs: Any, num_pairs: int, num_workers: int = 0, rows: int | None = None):
        self.pairs, self.num_pairs = pairs, int(num_pairs)
        self.rows = self.num_pairs if rows is None else int(rows)
        self.counters = torch.zeros(max(1, num_workers), 2, dtype=torch.long).share_memory_()

    # attach() sets the model's transform and tokenizer on every split's dataset.
    @property
    def transform(self) -> Callable | None:
        return self.pairs.transform

    @transform.setter
    def transform(self, value: Callable | None) -> None:
        self.pairs.transform = value

    @property
    def tokenizer(self) -> Callable | None:
        return self.pairs.tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Callable | None) -> None:
        self.pairs.tokenizer = value

    def __len__(self) -> int:
        return self.num_pairs

    def set_epoch(self, epoch: int) -> None:
        self.pairs.set_epoch(epoch)

    @property
    def skipped(self) -> int:
        return int(self.counters[:, 0].sum())

    @property
    def streamed(self) -> int:
        return int(self.counters[:, 1].sum())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        inner = self.pairs  # in a worker process: that worker's copy
        for item in inner:
            self.counters[slot, 0], self.counters[slot, 1] = inner.skipped, inner.pairs
            yield item
        self.counters[slot, 0], self.counters[slot, 1] = inner.skipped, inner.pairs


class ShardLoader(DataLoader):
    """DataLoader of a ``ShardTrainSet`` that starts every pass at the next epoch (a new shard order, also
    with fresh worker processes) and whose length bounds the batches of one rank from above.

    The bound (ceil of pairs per rank / batch size) lets the stream, not a batch count, end the epoch:
    every shard is read to its end, so the pass is complete and its counters are final. Undecodable images
    and the remainder each worker drops (``drop_last``) make the real count a little lower.
    Under DDP every rank must take the same number of steps: when ranks may get unequal shares (few or
    unequal shards), cap the epoch with an integer ``trainer.limit_train_batches`` below the smallest share.
    """

    def __init__(self, dataset: ShardTrainSet, next_epoch: Callable[[], int], world_size: int = 1,
                 **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.next_epoch, self.world_size = next_epoch, world_size

    def __iter__(self) -> Any:
        self.dataset.set_epoch(self.next_epoch())
        self.dataset.counters.zero_()
        return super().__iter__()

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.dataset) / self.world_size) / self.batch_size)


def read_shard_samples(shards: Sequence[str], keys: set[str]) -> dict[str, tuple[str, bytes | None, str]]:
    """``{key: (shard, image bytes or None, category)}`` for the samples of ``keys``, in one pass over the
    shards. The category is the ``.json`` field ``category`` when present, else ``"none"``."""
    from ncu.data.wds import sample_image, sample_meta, samples_until_broken

    found: dict[str, tuple[str, bytes | None, str]] = {}
    for shard in shards:
        for key, parts in samples_until_broken(shard):
            if key not in keys:
                continue
            ext = sample_image(parts)
            category = sample_meta(parts).get("category")
            category = category.strip() if isinstance(category, str) and category.strip() else "none"
            found[key] = (shard, parts[ext] if ext else None, category)
    return found
