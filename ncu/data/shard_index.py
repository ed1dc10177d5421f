"""The index pass over a shard source: every (key, shard, caption), so that the noise is a global permutation
of the training keys (``ncu.data.noise``), cached as ``.npz`` while the shard list and sizes are unchanged. A
shard with img2dataset's ``.parquet`` beside it is read from that table, any other in one pass over its tar.

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

import json
import logging
import os
import zipfile
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from ncu.data.shardlist import expand_shards, is_url
from ncu.data.sources import clean_caption
from ncu.data.wds import sample_caption, sample_image, samples_until_broken
from ncu.files import atomic_path

log = logging.getLogger(__name__)


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
    """Local shards' sizes (an index cache is stale when one changes); -1 for a URL, which has none to read."""
    return np.asarray([-1 if is_url(s) else os.path.getsize(s) for s in shards], dtype=np.int64)


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
    if is_url(shard) or not os.path.exists(path):
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
