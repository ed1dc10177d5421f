"""Image decoding shared by every source (files, shard members)."""
from __future__ import annotations

from typing import Any

from PIL import Image


def load_image(path: Any, max_side: int | None = None) -> Image.Image:
    """RGB image; transparent pixels are composited on white (emoji and stamps are drawn on alpha).

    ``path`` is a file path or a binary file object (image bytes read from a shard)."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
    if max_side and max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.BICUBIC)
    return im
