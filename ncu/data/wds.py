"""WebDataset tar shards (CC3M/CC12M as written by img2dataset), read with the standard library only.

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

Memory of the index (``build_index`` output: key and caption as Python strings, shard categorical),
measured with ``pandas.DataFrame.memory_usage(deep=True)`` on a synthetic 100k-row frame (9-digit keys,
1,000-row shards; pandas 3.1, CPython 3.11, no pyarrow): 124 bytes per row plus one byte per caption
character (ASCII; CPython stores other text at 2 or 4 bytes per character). For 12M pairs with captions of
100 characters on average this is 12e6 x 224 B ~ 2.7 GB; for 3.3M CC3M-style captions of 55 characters,
3.3e6 x 179 B ~ 0.6 GB. ``ShardPairs`` with a noise map adds four int64 arrays (32 B per row, ~0.4 GB for
12M) and two object-pointer arrays (16 B per row). Every DataLoader worker holds a copy-on-write copy, and
Python reference counts touch its pages, so resident memory grows towards workers x index size over an
epoch: keep the worker count modest.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
import zipfile
import zlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ncu.data.images import load_image
from ncu.data.shardlist import expand_shards
from ncu.data.sources import clean_caption
from ncu.files import atomic_path

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_FIELDS = ("caption", "text")
_SHARD_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


# ---------------------------------------------------------------------------------------- tar members
def split_member(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member: the key ends at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    dot = base.find(".")
    if dot <= 0:
        return None
    return (f"{folder}/{base[:dot]}" if folder else base[:dot]), base[dot + 1:].lower()


def iter_samples(shard: str, read_images: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream ``(key, {extension: bytes})`` from a tar shard without extracting it.

    With ``read_images=False`` image members are only noted (empty bytes): the index pass skips their data.
    """
    with tarfile.open(shard, "r|*") as tf:
        plain = tf.fileobj.comptype == "tar"  # uncompressed: the end-of-archive check below
        key, parts = None, {}
        for member in tf:
            if not member.isfile():
                continue
            split = split_member(member.name)
            if split is None:
                continue
            k, ext = split
            if k != key:
                if key is not None:
                    yield key, parts
                key, parts = k, {}
            if ext in IMAGE_EXTS:
                parts[ext] = tf.extractfile(member).read() if read_images else b""
            elif ext in ("txt", "json"):
                parts[ext] = tf.extractfile(member).read()
        if plain and os.path.getsize(shard) < tf.offset + 2 * tarfile.BLOCKSIZE:
            # tarfile takes end of file for the end of the archive; a tar cut at a member boundary would
            # read as a shorter shard. Every tar writer ends the archive with two zero blocks.
            raise tarfile.ReadError("no end-of-archive marker: the file is truncated")
        if key is not None:
            yield key, parts



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
def _pack(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 blob + offsets: compact, and loads without pickle (fixed-width unicode arrays would not be)."""
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _unpack(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = blob.tobytes()
    return [raw[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _shard_sizes(shards: Sequence[str]) -> np.ndarray:
    return np.asarray([os.path.getsize(s) for s in shards], dtype=np.int64)


def _frame(keys: list[str], shard_ids: np.ndarray, shards: list[str], captions: list[str]) -> pd.DataFrame:
    return pd.DataFrame({
        "key": pd.Series(keys, dtype="str"),
        "shard": pd.Categorical.from_codes(shard_ids, categories=pd.Index(shards, dtype="str")),
        "caption": pd.Series(captions, dtype="str"),
    })


def save_index(index: pd.DataFrame, path: str | os.PathLike) -> None:
    shards = [str(s) for s in index["shard"].cat.categories]
    kb, ko = _pack(index["key"].tolist())
    cb, co = _pack(index["caption"].tolist())
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # an interrupted save never leaves a half cache
        np.savez(f, keys=kb, key_offsets=ko, captions=cb, caption_offsets=co,
                 shard_id=index["shard"].cat.codes.to_numpy().astype(np.int32),
                 shards=np.asarray(json.dumps(shards)), shard_sizes=_shard_sizes(shards),
                 stats=np.asarray(json.dumps(index.attrs.get("stats", {}))))


def load_index(path: str | os.PathLike, shards: Sequence[str] | None = None) -> pd.DataFrame | None:
    """The cached index, or None when ``shards`` (list or sizes) differ from those it was built from."""
    try:
        z = np.load(path, allow_pickle=False)
        cached = json.loads(str(z["shards"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("index cache %s is unreadable (%s): rebuilding it", path, type(e).__name__)
        return None
    with z:
        if shards is not None and (list(shards) != cached or not np.array_equal(_shard_sizes(cached),
                                                                                 z["shard_sizes"])):
            return None
        index = _frame(_unpack(z["keys"], z["key_offsets"]), z["shard_id"], cached,
                       _unpack(z["captions"], z["caption_offsets"]))
        index.attrs["stats"] = json.loads(str(z["stats"])) if "stats" in z.files else {}
        return index


def read_parquet_index(shard: str) -> list[tuple[str, Any]] | None:
    """``[(key, caption)]`` of the samples img2dataset saved in ``shard`` (its ``<shard>.parquet``: rows with
    ``status == "success"``), or None when there is no such table or it lacks the columns."""
    path = os.path.splitext(shard)[0] + ".parquet"
    if not os.path.exists(path):
        return None
    try:
        table = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - any reader error: fall back to the tar pass
        log.warning("%s unreadable (%s): indexing %s from the tar", path, type(e).__name__, shard)
        return None
    if "key" not in table.columns or "caption" not in table.columns:
        return None
    if "status" in table.columns:
        table = table[table["status"] == "success"]
    return list(zip(table["key"].astype(str), table["caption"]))


def _index_entries(shard: str, stats: dict[str, int],
                   use_parquet: bool) -> Iterator[tuple[str, str | None, bool]]:
    """``(key, cleaned caption or None, has an image)`` of each sample of ``shard``: from img2dataset's table
    beside it when there is one (no pass over the tar), else from its tar members."""
    table = read_parquet_index(shard) if use_parquet else None
    if table is not None:
        stats["parquet_shards"] += 1
        for key, caption in table:
            yield key, clean_caption(caption)[0], True
        return

    def bad_shard(_: Exception) -> None:
        stats["bad_shards"] += 1

    for key, parts in samples_until_broken(shard, read_images=False, on_error=bad_shard):
        yield key, sample_caption(parts), sample_image(parts) is not None


def build_index(shards: str | Sequence[str], cache_path: str | os.PathLike | None = None,
                use_parquet: bool = True) -> pd.DataFrame:
    """DataFrame[key, shard, caption] of the samples that have an image member and a non-empty caption, in
    shard order. A shard with img2dataset's ``.parquet`` beside it is read from that table (its successful
    rows; ``use_parquet=False`` ignores it); any other is read in one streaming pass over its tar members,
    image data not decoded (a corrupt image is found only when ``ShardPairs`` reads it). ``cache_path``
    (``.npz``): loaded when it was built from the same shard list and shard sizes, else (re)built and saved.
    Counts are in ``index.attrs["stats"]`` (``parquet_shards``: shards indexed from their table).
    """
    shards = expand_shards(shards)
    if len(set(shards)) != len(shards):
        raise ValueError("the shard list names a shard twice: its samples would be indexed twice")
    if cache_path is not None and os.path.exists(cache_path):
        index = load_index(cache_path, shards)
        if index is not None:
            log.info("index %s: %d samples from %d shards (cached)", cache_path, len(index), len(shards))
            return index
        log.info("index cache %s is stale (shard list or sizes changed): rebuilding", cache_path)
    keys: list[str] = []
    captions: list[str] = []
    shard_ids: list[int] = []
    stats = {"samples": 0, "no_image": 0, "no_caption": 0, "bad_shards": 0, "parquet_shards": 0}
    for sid, shard in enumerate(shards):
        for key, caption, has_image in _index_entries(shard, stats, use_parquet):
            stats["samples"] += 1
            if not has_image:
                stats["no_image"] += 1
            elif caption is None:
                stats["no_caption"] += 1
            else:
                keys.append(key)
                captions.append(caption)
                shard_ids.append(sid)
    index = _frame(keys, np.asarray(shard_ids, dtype=np.int32), shards, captions)
    dup = index["key"][index["key"].duplicated()]
    if len(dup):
        raise ValueError(f"{len(dup)} duplicated sample keys across/within shards, "
                         f"e.g. {dup.head(3).tolist()}; keys must be unique and the members of a sample "
                         "consecutive in its tar")
    if stats["no_image"] or stats["no_caption"] or stats["bad_shards"]:
        log.warning("index: %s", stats)
    index.attrs["stats"] = stats
    if cache_path is not None:
        save_index(index, cache_path)
    return index


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

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size = _world(self.rank, self.world_size)
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        self.epoch += 1
        if len(self.shards) < world_size * num_workers and worker == 0 and rank == 0:
            log.warning("%d shards for %d ranks x %d workers: some readers get no shard", len(self.shards),
                        world_size, num_workers)
        mine = self.shards_for(epoch, rank, world_size, worker, num_workers)
        self._reset_counters()
        self._t0 = time.perf_counter()
        raw = self._raw_pairs(mine)
        if self.shuffle_buffer > 1:
            raw = self._buffered(raw, np.random.default_rng([self.seed, epoch, rank, worker]))
        for image, caption, row, image_key in raw:
            yield self._item(image, caption, row, image_key)
        self._t1 = time.perf_counter()
        log.info("rank %d worker %d epoch %d: %d pairs from %d shards in %.1fs (%.1f pairs/s), "
                 "%d undecodable images skipped, %d unreadable shards", rank, worker, epoch, self.pairs,
                 len(mine), self.elapsed, self.pairs_per_s, self.skipped, self.bad_shards)

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

    def _raw_pairs(self, shards: list[str]) -> Iterator[tuple[Any, str, int, str]]:
        """(decoded image, caption, caption row or -1, key of the image) before transform."""
        for shard in shards:
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

