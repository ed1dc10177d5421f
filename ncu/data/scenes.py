"""Composed emoji scenes: an embedded benchmark where every concept recurs, so mismatched pairs contradict the data.

Each image is a white canvas with 1-3 Twemoji from a fixed vocabulary, placed left to right in horizontal
slots with random size and height; its caption names them in that order ("bug and straight ruler",
"an icon of cat, tent and bell"). Every concept appears in many training pairs, so a corrupted pair (its
caption shuffled to another image) disagrees with what the rest of the training split teaches, as on web
data where concepts recur. Validation and test hold fresh compositions of seen concepts (2-3 objects, an
ordered concept tuple never seen in training nor in another split, each caption once per split). The
zero-shot task classifies single-emoji images over the vocabulary's names.

Generated once, deterministically (from the Twemoji assets and ``seed``), and cached as PNG files plus a
``pairs.csv`` under ``cache_dir/<key>/``, where ``key`` hashes every generation parameter.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ncu.data.embedded import twemoji_pairs, unit_hash
from ncu.files import remove_stale_temporaries, temporary_prefix

GENERATOR_VERSION = 1
PREFIXES = ("an icon of ", "a picture of ", "a drawing of ")
PARAMS = ("n_concepts", "n_train", "n_val", "n_test", "image_size", "max_objects", "prefix_prob",
          "zs_per_concept", "max_name_words", "seed", "train_size")
DEFAULTS = {"n_concepts": 100, "n_train": 4000, "n_val": 400, "n_test": 800, "image_size": 64,
            "max_objects": 3, "prefix_prob": 0.33, "zs_per_concept": 2, "max_name_words": 3, "seed": 0,
            "train_size": None}


def params_of(cfg: dict) -> dict:
    """The generation parameters of a data config (defaults filled in), in a fixed order."""
    out = {k: cfg.get(k, DEFAULTS[k]) for k in PARAMS}
    for k in ("n_concepts", "n_train", "n_val", "n_test", "image_size", "max_objects", "zs_per_concept"):
        if not isinstance(out[k], int) or isinstance(out[k], bool) or out[k] < 1:
            raise ValueError(f"data.{k}={out[k]!r} is invalid: it must be a positive integer")
    size = out["train_size"]
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ValueError(f"data.train_size={size!r} is invalid: it must be null or a positive integer")
    if size == out["n_train"]:
        out["train_size"] = None  # the same set: the same cache key
    if not 0 <= out["prefix_prob"] <= 1:
        raise ValueError(f"data.prefix_prob={out['prefix_prob']!r} is invalid: it must be in [0, 1]")
    return out


def scene_key(params: dict) -> str:
    # train_size joined the parameters later: unset, the key (and the cached set) is the one from before.
    params = {k: v for k, v in params.items() if not (k == "train_size" and v is None)}
    spec = json.dumps({**params, "version": GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha1(spec.encode()).hexdigest()[:10]


def vocabulary(n_concepts: int, max_name_words: int, seed: int) -> pd.DataFrame:
    """``n_concepts`` Twemoji with distinct short names, chosen by a hash of their code (stable order)."""
    pool = twemoji_pairs(skin_tones=False)
    pool = pool[pool["caption"].str.split().str.len() <= max_name_words]
    pool = pool[~pool["caption"].str.contains(r"[:,()]| and ", regex=True)]  # unambiguous lists
    pool = pool.drop_duplicates("caption")
    order = np.argsort(pool["key"].map(lambda k: unit_hash(k, f"scenes{seed}")).to_numpy(), kind="stable")
    vocab = pool.iloc[order[:n_concepts]].reset_index(drop=True)
    if len(vocab) < n_concepts:
        raise ValueError(f"data.n_concepts={n_concepts}: only {len(vocab)} Twemoji have names of at most "
                         f"{max_name_words} words")
    return vocab


def caption_of(names: list[str], prefix: str) -> str:
    body = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return prefix + body


def layout(n: int, rng: np.random.Generator, size: int) -> list[tuple[int, int, int]]:
    """``(x, y, side)`` of ``n`` sprites left to right, one per horizontal slot, random side (60-100 % of the
    slot) and height."""
    boxes = []
    slot = size / n
    for i in range(n):
        top = max(4, int(min(slot, 0.6 * size)))
        side = int(rng.integers(max(3, int(0.6 * top)), top + 1))
        x = int(i * slot + rng.integers(0, max(1, int(slot) - side + 1)))
        y = int(rng.integers(0, size - side + 1))
        boxes.append((x, y, side))
    return boxes


def compose(sprites: list[Image.Image], boxes: list[tuple[int, int, int]], size: int) -> Image.Image:
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    for sprite, (x, y, side) in zip(sprites, boxes):
        im = sprite.resize((side, side), Image.BICUBIC)
        canvas.paste(im, (x, y), im)
    return canvas


def _compositions(rng: np.random.Generator, n: int, n_concepts: int, sizes: tuple[int, ...],
                  taken: set[tuple[int, ...]], unique: bool) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct compositions of {sizes} objects from {n_concepts} concepts")
        k = int(rng.choice(sizes))
        combo = tuple(int(c) for c in rng.choice(n_concepts, size=k, replace=False))
        if combo in taken or (unique and combo in seen):
            continue
        seen.add(combo)
        out.append(combo)
    return out


def generate(params: dict, out_dir: Path, style: str = "twemoji") -> pd.DataFrame:
    """Write the images and ``pairs.csv`` (key, image, caption, category, group, split) into ``out_dir``.

    In another ``style`` (ncu/data/styles.py) only the evaluation sets are drawn (val, test, zero-shot), with
    the very compositions, captions and placements of the Twemoji set (the same random draws, in the same
    order); a pair with a concept the style does not draw is left out, and ``style.json`` counts them."""
    from ncu.data.styles import STYLES

    p = params
    vocab = vocabulary(p["n_concepts"], p["max_name_words"], p["seed"])
    draw = STYLES[style].drawing()
    sprites = [draw(key.split(":", 1)[1].upper(), Path(path)) for key, path in zip(vocab["key"], vocab["image"])]
    names = vocab["caption"].tolist()
    rng = np.random.default_rng([p["seed"], 7])
    sizes_all = tuple(range(1, p["max_objects"] + 1))
    sizes_eval = tuple(range(min(2, p["max_objects"]), p["max_objects"] + 1))
    train = _compositions(rng, p["n_train"], len(names), sizes_all, set(), unique=False)
    taken = set(train)
    val = _compositions(rng, p["n_val"], len(names), sizes_eval, taken, unique=True)
    test = _compositions(rng, p["n_test"], len(names), sizes_eval, taken | set(val), unique=True)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows, left_out = [], {}
    evaluation_only = style != "twemoji"

    size = p["train_size"] or p["n_train"]

    def emit(split: str, key: str, stem: str, combo: tuple[int, ...], caption: str, category: str,
             draws: np.random.Generator = rng, keep: bool = True) -> None:
        boxes = layout(len(combo), draws, p["image_size"])  # drawn even for a pair left out: same later draws
        if not keep or (evaluation_only and split == "train"):
            return
        if any(sprites[c] is None for c in combo):
            left_out[split] = left_out.get(split, 0) + 1
            return
        file = out_dir / "images" / f"{stem}.png"
        compose([sprites[c] for c in combo], boxes, p["image_size"]).save(file)
        rows.append((key, f"images/{file.name}", caption, category, key, split))

    def emit_pairs(split: str, combos: list[tuple[int, ...]], draws: np.random.Generator, start: int = 0) -> None:
        for i, combo in enumerate(combos, start):
            prefix = PREFIXES[int(draws.integers(len(PREFIXES)))] if draws.random() < p["prefix_prob"] else ""
            emit(split, f"scenes:{split}:{i:05d}", f"{split}_{i:05d}", combo,
                 caption_of([names[c] for c in combo], prefix), names[combo[0]], draws,
                 keep=split != "train" or i < size)

    for split, combos in (("train", train), ("val", val), ("test", test)):
        emit_pairs(split, combos, rng)
    for c, name in enumerate(names):
        for j in range(p["zs_per_concept"]):
            emit("zeroshot", f"scenes:zeroshot:{c:03d}_{j}", f"zeroshot_{c:03d}_{j}", (c,), name, name)
    if size > p["n_train"]:
        # More training pairs than n_train: drawn from a stream of their own after everything else, so the
        # evaluation sets stay those of n_train, and never one of their compositions.
        # Each drawn with its prefix and placement before the next: a smaller train_size is a prefix of a larger.
        extra, evaluation = np.random.default_rng([p["seed"], 8]), set(val) | set(test)
        for i in range(p["n_train"], size):
            emit_pairs("train", _compositions(extra, 1, len(names), sizes_all, evaluation, unique=False), extra,
                       start=i)
    frame = pd.DataFrame(rows, columns=["key", "image", "caption", "category", "group", "split"])
    frame.to_csv(out_dir / "pairs.csv", index=False)
    (out_dir / "params.json").write_text(json.dumps({**p, "version": GENERATOR_VERSION}, indent=2))
    if evaluation_only:
        missing = [name for name, sprite in zip(names, sprites) if sprite is None]
        (out_dir / "style.json").write_text(json.dumps(
            {"style": style, "concepts": len(names), "concepts_drawn": len(names) - len(missing),
             "missing": missing, "left_out": left_out}, indent=2))
    return frame


def _generated(folder: Path, make) -> None:
    """``make(tmp)`` into a temporary folder renamed to ``folder``, once: concurrent first uses (a sweep) each
    generate and the first rename wins; partial folders of killed generations are removed."""
    if folder.parent.is_dir():
        # Partial folders of killed generations, also those a concurrent generation outlived (it finished
        # first, so none of the later uses generates again).
        remove_stale_temporaries(folder.parent, folder.name)
    if (folder / "pairs.csv").exists():
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(folder.name), dir=folder.parent))
    try:
        make(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first
            if not (folder / "pairs.csv").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _read(folder: Path) -> pd.DataFrame:
    frame = pd.read_csv(folder / "pairs.csv", keep_default_na=False)
    frame["image"] = [str(folder / rel) for rel in frame["image"]]
    frame.attrs["folder"] = str(folder)
    return frame


def scene_pairs(cfg: dict, cache_dir: str | os.PathLike) -> pd.DataFrame:
    """The scene pairs of a data config, generated into ``cache_dir/scenes-<key>`` on first use.

    Image paths in the frame are absolute."""
    params = params_of(cfg)
    folder = Path(cache_dir) / f"scenes-{scene_key(params)}"
    _generated(folder, lambda tmp: generate(params, tmp))
    return _read(folder)


def shifted_scene_pairs(cfg: dict, cache_dir: str | os.PathLike, style: str) -> pd.DataFrame:
    """The evaluation pairs (val, test, zero-shot) of the data config's scenes drawn in ``style``, generated
    into ``cache_dir/scenes-<key>-<style>-<version key>`` on first use; ``frame.attrs["style"]`` holds the
    counts of ``style.json`` (concepts drawn, the missing ones, pairs left out per split)."""
    from ncu.data.styles import STYLES

    params = params_of(cfg)
    version = hashlib.sha1(STYLES[style].version().encode()).hexdigest()[:6]
    # The evaluation sets do not depend on the training size: every train_size shares one shifted set.
    folder = Path(cache_dir) / f"scenes-{scene_key({**params, 'train_size': None})}-{style}-{version}"
    _generated(folder, lambda tmp: generate({**params, 'train_size': None}, tmp, style))
    frame = _read(folder)
    frame.attrs["style"] = json.loads((folder / "style.json").read_text())
    return frame
