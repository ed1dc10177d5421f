"""CSV/TSV pair tables, retrieval tables and image verification on files written here."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from ncu.data.images import load_image
from ncu.data.sources import clean_caption, read_pairs_csv, read_retrieval_csv, verify_images


def write_images(folder: Path) -> dict[str, Path]:
    """Good images in several modes, and three bad ones (truncated JPEG, text named .jpg, missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    Image.new("RGB", (12, 10), (200, 30, 40)).save(paths.setdefault("rgb", folder / "rgb.jpg"), "JPEG")
    Image.new("L", (8, 8), 77).save(paths.setdefault("gray", folder / "gray.png"))
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black -> white after compositing
    rgba.putpixel((0, 0), (10, 200, 30, 255))
    rgba.save(paths.setdefault("rgba", folder / "rgba.png"))
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 20, 120, 220] + [0] * (256 * 3 - 6))
    pal.save(paths.setdefault("palette", folder / "palette.png"))
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "JPEG", quality=95)
    paths["truncated"] = folder / "truncated.jpg"
    paths["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    paths["text"] = folder / "notes.jpg"
    paths["text"].write_text("this is not an image")
    paths["missing"] = folder / "missing.png"
    return paths


def test_clean_caption_kinds():
    assert clean_caption("  a  red\tcar \n") == ("a red car", "ok")
    assert clean_caption(float("nan")) == (None, "empty")
    assert clean_caption(None) == (None, "empty")
    assert clean_caption("   ") == (None, "empty")
    assert clean_caption("007") == ("007", "number")
    assert clean_caption(" -3.5e2 ") == ("-3.5e2", "number")
    assert clean_caption(42) == ("42", "number")
    assert clean_caption("4 dogs") == ("4 dogs", "ok")


def test_csv_relative_paths_keys_and_caption_stats(tmp_path):
    sub = tmp_path / "set"
    write_images(sub / "img")
    absolute = sub / "img" / "gray.png"
    (sub / "pairs.csv").write_text(
        "image_path,caption,label\n"
        "img/rgb.jpg,a red  square,shapes\n"      # row0
        "img/gray.png,,shapes\n"                   # row1: empty cell
        f"{absolute},   ,shapes\n"                 # row2: whitespace only
        "img/rgba.png,12,digits\n"                 # row3: number
        "img/palette.png,\"blue, a palette\",shapes\n"  # row4: quoted comma
        ",orphan caption,x\n"                      # row5: no image path
    )
    df, stats = read_pairs_csv(sub / "pairs.csv", category_key="label")
    assert list(df.columns) == ["key", "image", "caption", "category", "group"]
    assert df["key"].tolist() == ["row0", "row3", "row4"]  # the file's row ids, gaps kept
    assert df["group"].tolist() == df["key"].tolist()
    assert df["image"].tolist() == [str(sub / "img/rgb.jpg"), str(sub / "img/rgba.png"),
                                    str(sub / "img/palette.png")]
    assert df["caption"].tolist() == ["a red square", "12", "blue, a palette"]
    assert df["category"].tolist() == ["shapes", "digits", "shapes"]
    assert stats == {"rows": 6, "kept": 3, "empty_captions": 2, "non_string_captions": 1,
                     "missing_image_paths": 1, "bad_text": 0}


def test_csv_absolute_path_and_key_column(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(img)
    (tmp_path / "t.csv").write_text(f"id,file,text\n000123,{img},hello\n000124,a.png,world\n")
    df, _ = read_pairs_csv(tmp_path / "t.csv", image_key="file", caption_key="text", key_key="id")
    assert df["key"].tolist() == ["000123", "000124"]  # zero padding kept: keys are read as text
    assert df["image"].tolist() == [str(img), str(img)]
    assert (df["category"] == "").all()


def test_csv_missing_column_lists_found_columns(tmp_path):
    (tmp_path / "t.csv").write_text("filepath,title\nx.png,hi\n")
    with pytest.raises(ValueError) as e:
        read_pairs_csv(tmp_path / "t.csv")
    msg = str(e.value)
    assert "'image_path'" in msg and "filepath" in msg and "title" in msg
    with pytest.raises(ValueError, match="'caption'.*filepath"):
        read_pairs_csv(tmp_path / "t.csv", image_key="filepath")


def test_csv_missing_file_and_duplicate_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_pairs_csv(tmp_path / "nope.csv")
    (tmp_path / "d.csv").write_text("k,image_path,caption\na,x.png,one\na,y.png,two\n")
    with pytest.raises(ValueError, match="duplicated"):
        read_pairs_csv(tmp_path / "d.csv", key_key="k")


def test_tsv_auto_separator_and_bare_quotes(tmp_path):
    (tmp_path / "cc.tsv").write_text(
        "caption\turl\n"
        'he said "hi, there\thttp://a/1.jpg\n'
        "a dog, running\thttp://a/2.jpg\n"
    )
    df, stats = read_pairs_csv(tmp_path / "cc.tsv", image_key="url")
    assert df["caption"].tolist() == ['he said "hi, there', "a dog, running"]
    assert stats["kept"] == 2
    # CC3M's own file has no header row.
    (tmp_path / "raw.tsv").write_text("first caption\tp/1.jpg\nsecond\tp/2.jpg\n")
    df, _ = read_pairs_csv(tmp_path / "raw.tsv", image_key="url", names=["caption", "url"])
    assert df["caption"].tolist() == ["first caption", "second"]
    assert df["image"].tolist() == [str(tmp_path / "p/1.jpg"), str(tmp_path / "p/2.jpg")]
    # The same table read with the wrong separator names the single column it found.
    with pytest.raises(ValueError, match="sep="):
        read_pairs_csv(tmp_path / "cc.tsv", image_key="url", sep=",")


def test_retrieval_csv_groups_non_consecutive_rows(tmp_path):
    rows = [("b.jpg", "b one"), ("a.jpg", "a one"), ("b.jpg", "b two"), ("c.jpg", "c one"),
            ("a.jpg", "a two"), ("b.jpg", "b three")]
    (tmp_path / "test.csv").write_text("image,sentence\n" + "".join(f"{i},{c}\n" for i, c in rows))
    images, captions, t2i = read_retrieval_csv(tmp_path / "test.csv", "image", "sentence")
    assert images == [str(tmp_path / n) for n in ("b.jpg", "a.jpg", "c.jpg")]
    assert captions == [c for _, c in rows]
    np.testing.assert_array_equal(t2i, [0, 1, 0, 2, 1, 0])
    assert t2i.dtype == np.int64


def test_verify_images_skips_bad_files_and_converts_modes(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)  # global PIL switch: pin it
    paths = write_images(tmp_path)
    order = ["rgb", "gray", "rgba", "palette", "truncated", "text", "missing"]
    ok, skipped = verify_images([str(paths[k]) for k in order])
    np.testing.assert_array_equal(ok, [True, True, True, True, False, False, False])
    assert skipped == 3
    gray = load_image(str(paths["gray"]))
    assert gray.mode == "RGB" and gray.getpixel((3, 3)) == (77, 77, 77)
    rgba = load_image(str(paths["rgba"]))
    assert rgba.mode == "RGB"
    assert rgba.getpixel((0, 0)) == (10, 200, 30) and rgba.getpixel((5, 5)) == (255, 255, 255)
    pal = load_image(str(paths["palette"]))
    assert pal.mode == "RGB" and pal.getpixel((2, 2)) == (20, 120, 220)
