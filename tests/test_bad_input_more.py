"""More bad input: unreadable images that empty a split, 16-bit images."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ncu.data.datamodule import PairDataModule
from ncu.data.images import load_image
from ncu.errors import DataError


def test_the_split_size_check_counts_the_pairs_left_after_unreadable_images(tmp_path):
    rows = []
    for i in range(80):
        path = tmp_path / f"{i}.png"
        if i % 3:  # two of every three images do not decode
            path.write_bytes(b"not an image")
        else:
            Image.new("RGB", (8, 8), (i, 0, 0)).save(path)
        rows.append({"image_path": str(path), "caption": f"thing number {i}"})
    table = tmp_path / "pairs.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    data = {"name": "csv", "source": "csv", "path": str(table), "image_key": "image_path", "caption_key": "caption",
            "val_frac": 0.1, "test_frac": 0.2, "max_side": 8}
    dm = PairDataModule(data, {"protocol": "caption", "rate": 0.2, "seed": 0}, batch_size=32,
                        noise_dir=str(tmp_path / "noise"))
    # ~56 training rows pass the first check; a third of them decode, fewer than one batch of 32
    with pytest.raises(DataError, match=r"training split has \d+ pairs, after dropping \d+ pairs whose images are "
                                        r"unreadable, fewer than one batch \(data\.batch_size=32\)"):
        dm.setup()


@pytest.mark.parametrize("dtype, suffix", [(np.uint16, ".png"), (np.int32, ".tif")], ids=["I;16", "I"])
def test_16_bit_images_are_scaled_from_their_range_not_clipped_to_white(tmp_path, dtype, suffix):
    ramp = np.linspace(0, 65535, 64).reshape(8, 8).astype(dtype)
    path = tmp_path / f"ramp{suffix}"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")
    got = np.asarray(load_image(path))[..., 0].astype(int)
    want = np.rint(ramp.astype(float) / 257.0).astype(int)
    assert np.abs(got - want).max() <= 1  # convert("RGB") alone gives 255 for every pixel above 255
    assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) == 64
