"""Image decoding shared by every source (files, shard members)."""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image


def to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit (``I;16*``) or 32-bit integer (``I``) grayscale image scaled from its range (0-65535) to 0-255:
    ``convert("RGB")`` clips such values, so every pixel above 255 turned white. 8-bit modes are unchanged."""
    if not (im.mode.startswith("I;16") or im.mode == "I"):
        return im
    pixels = np.asarray(im, dtype=np.float64)
    if im.mode == "I" and pixels.max(initial=0) <= 255:  # 8-bit values stored as 32-bit integers
        return Image.fromarray(pixels.astype(np.uint8), "L")
    return Image.fromarray(np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8), "L")


def load_image(path: Any, max_side: int | None = None) -> Image.Image:
    """RGB image; transparent pixels are composited on white (emoji and stamps are drawn on alpha).

    ``path`` is a file path or a binary file object (image bytes read from a shard)."""
    with Image.open(path) as im:
        im.load()
        im = to_8bit(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
    if max_side and max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.BICUBIC)
    return im
