"""Image-caption tables on disk: CSV/TSV pair lists (CC3M/CC12M downloads) and retrieval test sets.

Caption cleaning, shared by every reader:
- whitespace runs collapse to one space and the ends are stripped;
- missing cells and captions that are empty after stripping are dropped and counted as ``empty_captions``;
- captions that look like numbers (``"42"``, ``"3.5e2"``) are kept as their text and counted as
  ``non_string_captions``. Cells are read as text (``dtype=str``), so a number is the string written in the
  file (``"007"`` stays ``"007"``; ``str()`` of a parsed number would have given ``"7"``). Such captions are
  usually a shifted column, hence the count; values that are Python numbers (frames built in memory) are
  converted with ``str()`` and counted the same way.
"""
from __future__ import annotations

import csv
import logging
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from ncu.data.images import load_image

log = logging.getLogger(__name__)

COLUMNS = ["key", "image", "caption", "category", "group"]
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_SPACE = re.compile(r"\s+")


def clean_caption(value: Any) -> tuple[str | None, str]:
    """``(text, kind)`` with kind ``"ok"``, ``"empty"`` (text is None) or ``"number"`` (kept as text)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, "empty"
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return str(value), "number"
    if not isinstance(value, str):
        value = str(value)
    text = _SPACE.sub(" ", value).strip()
    if not text:
        return None, "empty"
    return text, "number" if _NUMBER.match(text) else "ok"


def _separator(path: Path, sep: str | None) -> str:
    if sep is not None:
        return sep
    return "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","


def _read_table(path: str | os.PathLike, sep: str | None,
                names: list[str] | None, nrows: int | None = None) -> tuple[pd.DataFrame, Path]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pair table not found: {path}")
    sep = _separator(path, sep)
    # TSV captions contain bare quotes (CC3M): quoting would swallow tabs and rows, so it is off for tabs.
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    # Web captions carry stray non-UTF-8 bytes: each becomes U+FFFD and the rows are counted (bad_text).
    df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""], quoting=quoting,
                     header=None if names else "infer", names=names, nrows=nrows, encoding_errors="replace")
    return df, path


def _require(df: pd.DataFrame, path: Path, columns: dict[str, str | None], sep_hint: str = "pass sep=") -> None:
    for role, name in columns.items():
        if name is not None and name not in df.columns:
            found = [str(c) for c in df.columns]
            hint = f" (one column only: wrong separator? {sep_hint})" if len(found) == 1 else ""
            raise ValueError(f"{path}: column {name!r} ({role}) not found; columns found: {found}{hint}")


def require_columns(path: str | os.PathLike, sep: str | None, columns: dict[str, str | None],
                    sep_hint: str = "pass sep=") -> int:
    """Check ``{role: column}`` against the header row and read one data row only, so a wrong name fails
    before the table is read. Returns the number of data rows read (0: a header-only table)."""
    df, path = _read_table(path, sep, None, nrows=1)
    _require(df, path, columns, sep_hint)
    return len(df)


def _resolve(p: Any, base: Path) -> str | None:
    if not isinstance(p, str) or not p.strip():
        return None
    q = Path(p.strip()).expanduser()
    return str(q if q.is_absolute() else base / q)


def read_pairs_csv(
    path: str | os.PathLike,
    image_key: str = "image_path",
    caption_key: str = "caption",
    sep: str | None = None,
    category_key: str | None = None,
    key_key: str | None = None,
    names: list[str] | None = None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Pair table (columns key, image, caption, category, group) from a CSV/TSV with a header row.

    - ``sep`` None: tab for ``.tsv`` files, comma otherwise. ``names`` reads a header-less file
      (CC3M's ``Train_GCC-training.tsv``) with these column names.
    - Relative image paths are resolved against the table's folder. Existence is not checked here
      (see ``verify_images``): at CC scale that is a separate, parallelisable pass.
    - key: the ``key_key`` column (must be unique) or ``"row{i}"`` with i the 0-based data row of the file,
      stable under dropping rows. group = key, so the hashed split puts each pair on its own.
    - category: the ``category_key`` column, else ``""``.

    Returns ``(frame, stats)``; stats counts ``rows``, ``kept``, ``empty_captions``, ``non_string_captions``,
    ``missing_image_paths`` (rows with an empty image cell, dropped) and ``bad_text`` (captions with bytes
    that are not UTF-8, each replaced by U+FFFD and the row kept).
    """
    df, path = _read_table(path, sep, names)
    _require(df, path, {"image_key": image_key, "caption_key": caption_key, "category_key": category_key,
                        "key_key": key_key})
    base = path.parent
    stats = {"rows": len(df), "kept": 0, "empty_captions": 0, "non_string_captions": 0,
             "missing_image_paths": 0,
             "bad_text": int(df[caption_key].str.contains("\ufffd", regex=False, na=False).sum())}
    if stats["bad_text"]:
        log.warning("%s: %d captions had bytes that are not UTF-8 (replaced by U+FFFD)", path, stats["bad_text"])
    rows = []
    keys = df[key_key].tolist() if key_key else [f"row{i}" for i in range(len(df))]
    cats = df[category_key].tolist() if category_key else [""] * len(df)
    columns = zip(keys, df[image_key].tolist(), df[caption_key].tolist(), cats)
    for i, (key, img, cap, cat) in enumerate(columns):
        text, kind = clean_caption(cap)
        if text is None:
            stats["empty_captions"] += 1
            continue
        stats["non_string_captions"] += kind == "number"
        image = _resolve(img, base)
        if image is None:
            stats["missing_image_paths"] += 1
            continue
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"{path}: empty {key_key!r} cell in data row {i}")
        key = key.strip()
        rows.append((key, image, text, "" if not isinstance(cat, str) else cat.strip(), key))
    out = pd.DataFrame(rows, columns=COLUMNS)
    dup = out["key"][out["key"].duplicated()]
    if len(dup):
        raise ValueError(f"{path}: column {key_key!r} has {len(dup)} duplicated keys, "
                         f"e.g. {dup.head(3).tolist()}; noise artifacts need unique sample keys")
    stats["kept"] = len(out)
    if stats["empty_captions"] or stats["missing_image_paths"] or stats["non_string_captions"]:
        log.warning("%s: %s", path, stats)
    return out, stats


def read_retrieval_csv(
    path: str | os.PathLike,
    image_key: str = "image_path",
    caption_key: str = "caption",
    sep: str | None = None,
    root: str | os.PathLike | None = None,
) -> tuple[list[str], list[str], np.ndarray]:
    """Retrieval test set, one row per (image, caption) as in Flickr30K/MSCOCO Karpathy-split tables.

    An image has several rows, consecutive or not. Returns ``(images, captions, text_to_image)``: images are
    unique in first-appearance order, ``text_to_image[j]`` is the index in ``images`` of caption j.
    Relative image paths are resolved against ``root`` (default: the table's folder). Rows with an empty
    caption or image cell are dropped (logged).
    """
    df, path = _read_table(path, sep, None)
    _require(df, path, {"image_key": image_key, "caption_key": caption_key})
    base = Path(root).expanduser() if root is not None else path.parent
    images: list[str] = []
    position: dict[str, int] = {}
    captions: list[str] = []
    t2i: list[int] = []
    dropped = 0
    for img, cap in zip(df[image_key].tolist(), df[caption_key].tolist()):
        text, _ = clean_caption(cap)
        image = _resolve(img, base)
        if text is None or image is None:
            dropped += 1
            continue
        if image not in position:
            position[image] = len(images)
            images.append(image)
        captions.append(text)
        t2i.append(position[image])
    if dropped:
        log.warning("%s: dropped %d rows with an empty caption or image path", path, dropped)
    return images, captions, np.asarray(t2i, dtype=np.int64)


def verify_images(paths: Iterable[str], max_side: int | None = None) -> tuple[np.ndarray, int]:
    """Open every image as training will (``load_image``). Returns ``(ok_mask, skipped_count)``.

    Missing, truncated and non-image files are skipped (logged); grayscale, palette and RGBA images are fine
    (``load_image`` converts them to RGB, alpha composited on white).
    """
    ok = []
    for p in paths:
        try:
            load_image(p, max_side)
            ok.append(True)
        except Exception as e:  # noqa: BLE001 - any decoder or file error means "bad file"
            log.warning("skipping unreadable image %s (%s: %s)", p, type(e).__name__, e)
            ok.append(False)
    mask = np.asarray(ok, dtype=bool)
    return mask, int((~mask).sum())
