"""Shifted emoji styles (ncu/data/styles.py) and the scenes drawn in them (data.shifts)."""
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ncu.data import scenes, styles

SMALL = {"n_concepts": 8, "n_train": 24, "n_val": 8, "n_test": 16, "image_size": 32, "zs_per_concept": 1}


def _alpha(im: Image.Image) -> np.ndarray:
    return np.asarray(im.getchannel("A"), dtype=np.int32)


def test_sketch_is_black_outlines_of_the_twemoji_drawing():
    vocab = scenes.vocabulary(4, 3, 0)
    for key, path in zip(vocab["key"], vocab["image"]):
        sk = styles.sketch(key.split(":")[1].upper(), path)
        alpha, rgb = _alpha(sk), np.asarray(sk.convert("RGB"), dtype=np.int32)
        drawn = alpha > 0
        assert sk.size == (styles.SPRITE, styles.SPRITE)
        assert 0.02 < drawn.mean() < 0.6, drawn.mean()  # lines, neither empty nor filled
        assert rgb[drawn].max() == 0  # black wherever drawn
        with Image.open(path) as tw:  # lines lie on the drawing or within 2 pixels of its outline
            near = tw.convert("RGBA").resize(sk.size).getchannel("A").filter(ImageFilter.MaxFilter(5))
        assert (drawn & (np.asarray(near) == 0)).sum() <= 0.01 * drawn.sum()


def test_a_font_draws_its_emoji_and_none_for_what_it_lacks():
    draw = styles.STYLES["openmoji"].drawing()
    cup = draw("2615")
    assert cup is not None and _alpha(cup).max() == 255 and len(set(cup.convert("RGB").getdata())) > 4
    assert draw("1F468-200D-1F373") is not None  # a ZWJ sequence the font draws as one glyph (man cook)
    assert draw("10FFFD") is None  # a code point no font maps
    assert draw("2615-200D-2615") is None  # a sequence the font lays out as two glyphs


def test_a_style_redraws_the_same_evaluation_scenes(tmp_path):
    base = scenes.scene_pairs(SMALL, tmp_path)
    shifted = scenes.shifted_scene_pairs(SMALL, tmp_path, "sketch")
    evaluation = base[base["split"] != "train"].reset_index(drop=True)
    assert list(shifted["key"]) == list(evaluation["key"])
    assert list(shifted["caption"]) == list(evaluation["caption"])
    assert shifted.attrs["style"]["left_out"] == {} and shifted.attrs["style"]["concepts_drawn"] == 8
    for a, b in zip(evaluation["image"][:5], shifted["image"][:5]):
        ta, tb = np.asarray(Image.open(a).convert("L")), np.asarray(Image.open(b).convert("L"))
        assert not np.array_equal(ta, tb)
        # the same placements: whatever the sketch draws lies where the Twemoji scene has objects
        assert (tb < 128).sum() > 0 and ((tb < 128) & (ta == 255)).mean() < 0.02


def test_concepts_a_style_does_not_draw_are_left_out_and_counted(tmp_path, monkeypatch):
    vocab = scenes.vocabulary(SMALL["n_concepts"], 3, 0)
    lacking = vocab["caption"][0]
    lacking_code = vocab["key"][0].split(":")[1].upper()

    def partial(code, path):
        return None if code == lacking_code else styles.twemoji(code, path)

    monkeypatch.setitem(styles.STYLES, "sketch", styles.Style("sketch", "test", lambda: None, lambda: "partial",
                                                               lambda: partial))
    base = scenes.scene_pairs(SMALL, tmp_path)
    shifted = scenes.shifted_scene_pairs(SMALL, tmp_path, "sketch")
    names = set(vocab["caption"])

    def has_lacking(caption):
        body = caption
        for p in scenes.PREFIXES:
            body = body.removeprefix(p)
        return lacking in body.replace(" and ", ", ").split(", ") and body in caption

    evaluation = base[base["split"] != "train"]
    expected = evaluation[~evaluation["caption"].map(has_lacking)]
    assert list(shifted["key"]) == list(expected["key"])
    counts = shifted.attrs["style"]
    assert counts["missing"] == [lacking] and counts["concepts_drawn"] == len(names) - 1
    dropped = evaluation[evaluation["caption"].map(has_lacking)]
    assert counts["left_out"] == dropped["split"].value_counts().to_dict()
    assert json.loads((tmp_path / next(p.name for p in tmp_path.iterdir() if p.name.endswith(
        f"-sketch-{__import__('hashlib').sha1(b'partial').hexdigest()[:6]}")) / "style.json").read_text()) == counts


def test_a_style_this_machine_cannot_draw_is_skipped_with_one_line(make_cfg, monkeypatch, caplog):
    from ncu.run import build

    monkeypatch.setattr(styles, "NOTO_FONT", "/nonexistent/NotoColorEmoji.ttf")
    caplog.set_level("INFO")
    _, dm, module = build(make_cfg("data.shifts=[noto,sketch]"))
    assert list(dm.shifts) == ["sketch"] and list(module.shift_sets) == ["sketch"]
    assert "style 'noto' skipped: it needs the Debian package fonts-noto-color-emoji" in caplog.text


@pytest.mark.parametrize("override, message", [
    ("data.shifts=[vangogh]", "data.shifts='vangogh' is unknown"),
    ("data=embedded data.shifts=[sketch]", "the shifted styles redraw the scenes data"),
])
def test_bad_shift_settings_are_refused_at_start(make_cfg, override, message):
    from ncu.config import ConfigError, validate

    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(*override.split()))
