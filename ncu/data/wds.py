"""WebDataset tar shards (CC3M/CC12M as written by img2dataset), read through the ``webdataset`` library: local
files, ``pipe:`` commands and URLs, brace lists.

A sample is the group of consecutive tar members sharing a key: ``{key}.jpg|.jpeg|.png|.webp`` plus a caption
in ``{key}.txt`` or in ``{key}.json`` under ``"caption"`` (or ``"text"``). The key is the member path up to
the first dot of its file name, as in the WebDataset convention.

Noise at scale. Corruption is keyed on sample keys, so a first pass (``build_index``) lists every
(key, shard, caption); ``ncu.data.noise.build_or_load(..., keys=index.key, captions=index.caption)`` then
gives ``perm``: caption k is shown with the image of key ``perm[k]``. A stream visits images, not captions,
so ``ShardPairs`` inverts the map: when it reads the image of key i it yields every caption k with
``perm[k] == i`` (exactly one for the permutation protocols, zero or several for ``random_replace``). The
pairs produced in one epoch are therefore exactly ``{(image perm[k], caption k)}`` for all k, the same set as
the in-memory ``PairDataset`` with ``image_index=perm``; only the order differs. Captions are looked up in
the index, so a caption can travel to an image in another shard, on another rank. The one difference: when
an image fails to decode, the captions assigned to it are lost for the epoch (counted in ``skipped``), while
its own caption, shown elsewhere, is still used.

The index pass (``build_index``) lives in ``ncu/data/shard_index.py``.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import tarfile
import time
import zlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset import tariterators as wds_tar

from ncu.data.images import load_image
from ncu.data.shardlist import expand_shards, is_url
from ncu.data.sources import clean_caption

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_FIELDS = ("caption", "text")
# A truncated or unreadable tar, a failed pipe: command (webdataset raises OSError on its exit status), a
# duplicated member name (ValueError).
_SHARD_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, ValueError)


# ---------------------------------------------------------------------------------------- tar members
def _has_end_marker(path: str) -> bool:
    """A local uncompressed tar ends with two zero blocks (every tar writer adds them). The tar reader takes
    the end of the file for the end of the archive, so a tar cut at a member boundary would read as a
    complete, shorter shard; compressed tars fail on their own checksums."""
    with open(path, "rb") as f:
        head = f.read(6)
        if head[:2] in (b"\x1f\x8b", b"BZ") or head == b"\xfd7zXZ\x00":
            return True
        size = os.path.getsize(path)
        if size < 1024 or size % tarfile.BLOCKSIZE:
            return False
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def _wanted_member(name: str) -> bool:
    return name.rpartition(".")[2].lower() in (*IMAGE_EXTS, "txt", "json")


def _checked_end(files: Iterator[dict[str, Any]], shard: str) -> Iterator[dict[str, Any]]:
    yield from files
    if not is_url(shard) and not _has_end_marker(shard):
        # raised before the grouping yields the last sample, which may have lost members to the cut
        raise tarfile.ReadError("no end-of-archive marker: the file is truncated")


def iter_samples(shard: str, read_images: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream ``(key, {extension: bytes})`` from a shard through the ``webdataset`` library: a local tar, or
    any URL it opens (``pipe:aws s3 cp s3://bucket/00000.tar -``, ``pipe:curl -s https://.../00000.tar``).
    The members of a sample are consecutive and share the key (the name up to the first dot of the file
    name; extensions lower-cased). With ``read_images=False`` image members are kept as empty bytes.
    """
    opened = wds_tar.url_opener([{"url": shard}])
    files = wds_tar.tar_file_expander(opened, select_files=_wanted_member, eof_value=None)
    for sample in wds_tar.group_by_keys(_checked_end(files, shard)):
        parts = {ext: (data if read_images or ext not in IMAGE_EXTS else b"")
                 for ext, data in sample.items() if not ext.startswith("__")}
        yield sample["__key__"], parts


def samples_until_broken(shard: str, read_images: bool = True,
                         on_error: Callable[[Exception], None] | None = None) -> Iterator[tuple[str, dict]]:
    """``iter_samples`` that stops at a truncated or unreadable shard (logged, ``on_error`` called) instead
    of raising, so one bad shard never ends an epoch."""
    samples = iter_samples(shard, read_images=read_images)
    n = 0
    while True:
        try:
            item = next(samples)
        except StopIteration:
            return
        except _SHARD_ERRORS as e:
            log.warning("shard %s is truncated or unreadable after %d samples (%s: %s); the rest of it is "
                        "skipped", shard, n, type(e).__name__, e)
            if on_error is not None:
                on_error(e)
            return
        n += 1
        yield item

def sample_meta(parts: Mapping[str, bytes]) -> dict[str, Any]:
    """The sample's ``.json`` member as a dict; empty when absent, malformed or not a JSON object."""
    if "json" not in parts:
        return {}
    try:
        meta = json.loads(parts["json"].decode("utf-8", errors="replace"))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def sample_caption(parts: Mapping[str, bytes]) -> str | None:
    """Cleaned caption of a sample: ``.txt`` first, else the json ``caption``/``text`` field."""
    if "txt" in parts:
        text, _ = clean_caption(parts["txt"].decode("utf-8", errors="replace"))
        if text is not None:
            return text
    meta = sample_meta(parts)
    for field in CAPTION_FIELDS:
        if isinstance(meta.get(field), str):
            text, _ = clean_caption(meta[field])
            if text is not None:
                return text
    return None


def sample_image(parts: Mapping[str, bytes]) -> str | None:
    return next((ext for ext in IMAGE_EXTS if ext in parts), None)


# ---------------------------------------------------------------------------------------------- index
def shard_weights(spec: str | Sequence[str], source_weights: Sequence[float] | None
                  ) -> tuple[list[str], list[float] | None]:
    """The shards of ``spec`` and, with ``source_weights`` (one per item of a list ``spec``: a source), each
    shard's draw weight: its source's weight spread evenly over the source's shards."""
    if source_weights is None:
        return expand_shards(spec), None
    sources = [spec] if isinstance(spec, str) else list(spec)
    if len(sources) != len(source_weights):
        raise ValueError(f"{len(source_weights)} source weights for {len(sources)} shard sources")
    shards: list[str] = []
    weights: list[float] = []
    for source, weight in zip(sources, source_weights):
        these = expand_shards(source)
        shards += these
        weights += [float(weight) / len(these)] * len(these)
    return shards, weights


# ------------------------------------------------------------------------------------------- dataset
def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return rank or 0, world_size or 1


class ShardPairs(IterableDataset):
    """Stream (image, caption) pairs from tar shards; items are dicts with ``image``, ``caption``, ``key``
    (the caption's key), ``image_key`` (the key of the shown image), ``noisy``, ``index`` (the caption's
    row in ``index``; -1 without a noise map) and ``text`` when a tokenizer is given.

    Noise: ``shown_image`` maps a caption key to the key of the image it is shown with (a Mapping, or an int
    array over the rows of ``index`` such as ``NoiseArtifact.perm``; see the module docstring for why the
    stream yields, for image i, every caption k with ``shown_image[k] == i``). Requires ``index``.

    Splitting: in every epoch the shard list is shuffled with ``(seed, epoch)`` (same order on every rank)
    and shard j goes to the (rank, worker) pair ``j % (world_size * num_workers)``, so each shard, hence
    each sample, is read exactly once per epoch. Use at least ``world_size * num_workers`` shards of similar
    size, or some ranks get fewer batches. ``rank``/``world_size`` default to ``torch.distributed`` when it
    is initialised. The epoch is the value given to ``set_epoch`` and advances by one after each pass
    through ``__iter__``, so persistent workers (whose copies never see ``set_epoch``) still reshuffle;
    non-persistent workers get a fresh copy each epoch: call ``set_epoch`` then.

    Resampled (``samples_per_epoch`` set, for object storage and mixtures): each (rank, worker) draws shards
    with replacement (``weights``: per-shard probabilities, e.g. a source's weight spread over its shards),
    seeded by ``(seed, epoch, rank, worker)``, and stops after its share ``ceil(samples_per_epoch / (ranks x
    workers))`` of pairs, inside a shard if need be. A sample may then be read twice in an epoch or not at all;
    the noise map still applies per image key.

    Counters of the iterating copy (main process with ``num_workers=0``, else logged by each worker at the
    end of its pass): ``pairs``, ``skipped`` (undecodable images), ``bad_shards``, ``unindexed`` (keys absent
    from the index), ``no_caption``, ``no_image``, and the throughput ``pairs_per_s``.
    """

    def __init__(
        self,
        shards: str | Sequence[str] | None = None,
        index: pd.DataFrame | None = None,
        shown_image: Mapping[str, str] | np.ndarray | None = None,
        transform: Callable | None = None,
        tokenizer: Callable | None = None,
        seed: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        max_side: int | None = None,
        samples_per_epoch: int | None = None,
        weights: Sequence[float] | None = None,
    ):
        super().__init__()
        if shards is None:
            if index is None:
                raise ValueError("ShardPairs needs shards or an index")
            shards = [str(s) for s in index["shard"].cat.categories]
        self.shards = expand_shards(shards)
        self.transform, self.tokenizer, self.max_side = transform, tokenizer, max_side
        self.seed, self.shuffle_shards, self.shuffle_buffer = seed, shuffle_shards, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        # Resampled (samples_per_epoch set): shards drawn with replacement, with these per-shard weights.
        self.samples_per_epoch = samples_per_epoch
        if weights is not None and len(weights) != len(self.shards):
            raise ValueError(f"{len(weights)} shard weights for {len(self.shards)} shards")
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.epoch = 0
        self.index = index
        self._noise = shown_image is not None
        if self._noise:
            self._setup_noise(index, shown_image)
        self._reset_counters()

    @classmethod
    def from_artifact(cls, index: pd.DataFrame, artifact: Any, **kwargs: Any) -> "ShardPairs":
        """Realise a ``NoiseArtifact`` built on ``index.key`` (one caption per image, as in CC3M/CC12M)."""
        if not np.array_equal(np.asarray(artifact.keys, dtype=str), index["key"].to_numpy(dtype=str)):
            raise ValueError("the noise artifact was built on other keys than this index (order included)")
        return cls(index=index, shown_image=np.asarray(artifact.perm), **kwargs)

    def _setup_noise(self, index: pd.DataFrame | None, shown_image: Mapping[str, str] | np.ndarray) -> None:
        if index is None:
            raise ValueError("a noise map (shown_image) needs the index: captions travel between shards")
        n = len(index)
        keys = index["key"].to_numpy(dtype=object)
        if isinstance(shown_image, Mapping):
            position = {k: i for i, k in enumerate(keys)}
            shown = np.arange(n, dtype=np.int64)
            for k, target in shown_image.items():
                if k not in position or target not in position:
                    raise ValueError(f"noise map entry {k!r} -> {target!r} names a key absent from the index")
                shown[position[k]] = position[target]
        else:
            shown = np.asarray(shown_image, dtype=np.int64)
            if shown.shape != (n,) or (n and (shown.min() < 0 or shown.max() >= n)):
                raise ValueError(f"shown_image must be {n} row indices into the index, "
                                 f"got shape {shown.shape}")
        missing = set(self.shards) - set(str(s) for s in index["shard"].cat.categories)
        if missing:
            raise ValueError(f"shards absent from the index: {sorted(missing)[:3]}; "
                             "build the index on the same shard list")
        self._keys = keys
        self._captions = index["caption"].to_numpy(dtype=object)
        self._noisy = shown != np.arange(n)
        # Inverse of the noise map, CSR-style: the captions shown with image row i are
        # _by_image[_start[i]:_start[i + 1]].
        self._by_image = np.argsort(shown, kind="stable")
        self._start = np.searchsorted(shown[self._by_image], np.arange(n + 1))
        # Rows of each shard, to look keys up one shard at a time (a global key dict would cost ~100 B/row).
        codes = index["shard"].cat.codes.to_numpy()
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(index["shard"].cat.categories) + 1))
        self._rows_of = {str(s): order[bounds[c]:bounds[c + 1]]
                         for c, s in enumerate(index["shard"].cat.categories)}

    def _reset_counters(self) -> None:
        self.pairs = self.skipped = self.bad_shards = self.unindexed = self.no_caption = self.no_image = 0
        self.shards_read = 0
        self._t0: float | None = None
        self._t1: float | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def elapsed(self) -> float:
        if self._t0 is None:
            return 0.0
        return (self._t1 if self._t1 is not None else time.perf_counter()) - self._t0

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.elapsed if self.elapsed > 0 else 0.0

    def shards_for(self, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
        """The shards one (rank, worker) reads in ``epoch``."""
        order = list(self.shards)
        if self.shuffle_shards:
            order = [order[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        return order[rank * num_workers + worker:: world_size * num_workers]

    def resampled_shards(self, epoch: int, rank: int, worker: int) -> Iterator[str]:
        """The endless draw, with replacement and ``weights``, of one (rank, worker)'s shards in ``epoch`` (as
        webdataset's ResampledShards, seeded by the run seed, epoch, rank and worker)."""
        rng = np.random.default_rng([self.seed, epoch, rank, worker])
        while True:
            yield self.shards[int(rng.choice(len(self.shards), p=self.weights))]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size = _world(self.rank, self.world_size)
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        self.epoch += 1
        self._reset_counters()
        self._t0 = time.perf_counter()
        if self.samples_per_epoch is not None:  # resampled: this reader's share of the epoch's pairs
            share = math.ceil(self.samples_per_epoch / (world_size * num_workers))
            mine: Any = self.resampled_shards(epoch, rank, worker)
            raw = itertools.islice(self._raw_pairs(mine), share)
        else:
            if len(self.shards) < world_size * num_workers and worker == 0 and rank == 0:
                log.warning("%d shards for %d ranks x %d workers: some readers get no shard", len(self.shards),
                            world_size, num_workers)
            mine = self.shards_for(epoch, rank, world_size, worker, num_workers)
            raw = self._raw_pairs(mine)
        if self.shuffle_buffer > 1:
            raw = self._buffered(raw, np.random.default_rng([self.seed, epoch, rank, worker]))
        for image, caption, row, image_key in raw:
            yield self._item(image, caption, row, image_key)
        self._t1 = time.perf_counter()
        log.info("rank %d worker %d epoch %d: %d pairs from %d shards in %.1fs (%.1f pairs/s), "
                 "%d undecodable images skipped, %d unreadable shards", rank, worker, epoch, self.pairs,
                 self.shards_read, self.elapsed, self.pairs_per_s, self.skipped, self.bad_shards)

    def _buffered(self, raw: Iterator[tuple], rng: np.random.Generator) -> Iterator[tuple]:
        buf: list[tuple] = []
        for item in raw:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            j = int(rng.integers(len(buf)))
            yield buf[j]
            buf[j] = item
        for j in rng.permutation(len(buf)):
            yield buf[j]

    def _count_bad_shard(self, _: Exception) -> None:
        self.bad_shards += 1

    def _raw_pairs(self, shards: Iterable[str]) -> Iterator[tuple[Any, str, int, str]]:
        """(decoded image, caption, caption row or -1, key of the image) before transform."""
        for shard in shards:
            self.shards_read += 1
            local = {self._keys[r]: int(r) for r in self._rows_of[shard]} if self._noise else None
            for key, parts in samples_until_broken(shard, on_error=self._count_bad_shard):
                if self._noise:
                    row = local.get(key)
                    if row is None:
                        self.unindexed += 1
                        continue
                    rows = self._by_image[self._start[row]:self._start[row + 1]]
                    if len(rows) == 0:
                        continue  # random_replace can leave an image without caption: no need to decode it
                    captions = [(self._captions[k], int(k)) for k in rows]
                else:
                    caption = sample_caption(parts)
                    if caption is None:
                        self.no_caption += 1
                        continue
                    captions = [(caption, -1)]
                ext = sample_image(parts)
                if ext is None:
                    self.no_image += 1
                    continue
                try:
                    image = load_image(io.BytesIO(parts[ext]), self.max_side)
                except Exception as e:  # noqa: BLE001 - any decoder error means "bad image"
                    self.skipped += 1
                    log.warning("skipping undecodable image %s in %s (%s)", key, shard, type(e).__name__)
                    continue
                for caption, row in captions:
                    self.pairs += 1
                    yield image, caption, row, key

    def _item(self, image: Any, caption: str, row: int, image_key: str) -> dict[str, Any]:
        if row >= 0:
            key, noisy = str(self._keys[row]), bool(self._noisy[row])
        else:
            key, noisy = image_key, False
        item = {"caption": caption, "key": key, "image_key": image_key, "noisy": noisy, "index": row}
        item["image"] = self.transform(image) if self.transform else image
        if self.tokenizer is not None:
            item["text"] = self.tokenizer([caption])[0]
        return item

