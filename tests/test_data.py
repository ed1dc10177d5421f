import numpy as np
import pytest
import torch

from ncu.data.datamodule import PairDataModule
from ncu.data.images import load_image
from ncu.data.embedded import embedded_pairs, split_of

NOISE = {"protocol": "caption", "rate": 0.4, "seed": 3}
DATA = {"name": "embedded", "source": "embedded", "limit": 300, "max_side": 32, "val_frac": 0.1,
        "test_frac": 0.2}


@pytest.fixture(scope="module")
def pairs():
    return embedded_pairs(("twemoji",))


def test_embedded_pairs_are_real_named_emoji(pairs):
    assert len(pairs) > 1500
    assert pairs["key"].is_unique
    row = pairs[pairs["caption"] == "hot beverage"]
    assert len(row) == 1 and row.iloc[0]["category"] == "food and drink"
    im = load_image(row.iloc[0]["image"])
    assert im.mode == "RGB" and im.size == (72, 72)
    assert im.getpixel((0, 0)) == (255, 255, 255)  # transparent corner composited on white


def test_split_is_deterministic_and_keeps_variants_together(pairs):
    splits = pairs["group"].map(lambda g: split_of(g, 0.1, 0.2))
    assert (splits == pairs["group"].map(lambda g: split_of(g, 0.1, 0.2))).all()
    per_group = splits.groupby(pairs["group"]).nunique()
    assert (per_group == 1).all()  # skin-tone variants never straddle train and test
    variants = pairs[pairs["key"] != pairs["group"]]
    assert len(variants) > 1000
    frac = splits.value_counts(normalize=True)
    assert 0.15 < frac["test"] < 0.25 and 0.05 < frac["val"] < 0.15


def _dm(tmp_path, noise=NOISE, **data):
    dm = PairDataModule({**DATA, **data}, noise, batch_size=32, noise_dir=str(tmp_path / "noise"))
    dm.setup()
    return dm


def test_training_split_is_corrupted_and_flags_are_true(tmp_path):
    dm = _dm(tmp_path)
    train = dm.datasets["train"]
    art = dm.noise_artifact
    assert art.meta["realised_rate"] == pytest.approx(train.noisy.mean())
    assert 0.38 <= art.realised_rate <= 0.4  # fixed points make it at most the target
    # the flag says exactly whether the shown image is another pair's image
    shown_other = train.image_index != np.arange(len(train))
    assert (shown_other == train.noisy).all()
    item = train[int(np.flatnonzero(train.noisy)[0])]
    assert item["noisy"] is True
    assert (art.keys == train.frame["key"].to_numpy()).all()
    for split in ("val", "test"):
        assert not dm.datasets[split].noisy.any()
        assert (dm.datasets[split].image_index == np.arange(len(dm.datasets[split]))).all()


def test_noise_depends_on_noise_seed_only_and_is_reused(tmp_path):
    torch.manual_seed(0)
    a = _dm(tmp_path).noise_artifact
    torch.manual_seed(123)
    np.random.seed(5)
    b = _dm(tmp_path / "other").noise_artifact  # rebuilt from scratch elsewhere: same corruption
    assert (a.perm == b.perm).all()
    c = _dm(tmp_path / "c", noise={**NOISE, "seed": 4}).noise_artifact
    assert (a.perm != c.perm).any()
    # a stored artifact is reused as is (even if the code that makes it changed): here another valid
    # corruption saved in its place, with its own record
    from ncu.data.noise import NoiseArtifact

    folder = _dm(tmp_path).noise_folder
    n = len(a.perm)
    other = np.roll(np.arange(n), 1)
    NoiseArtifact(a.keys, other, other != np.arange(n), {**a.meta, "num_noisy": n}).save(folder)
    reused = _dm(tmp_path).noise_artifact
    assert (reused.perm == other).all()


def test_clean_rate_zero(tmp_path):
    dm = _dm(tmp_path, noise={"protocol": "caption", "rate": 0.0, "seed": 0})
    assert not dm.datasets["train"].noisy.any()


def test_unreadable_images_are_skipped_and_counted(tmp_path, pairs):
    from ncu.data.datamodule import PairDataset

    frame = pairs.head(5).copy()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    frame.loc[frame.index[1], "image"] = str(bad)
    frame.loc[frame.index[3], "image"] = str(tmp_path / "missing.png")
    ds = PairDataset(frame.reset_index(drop=True))
    assert ds.skipped == 2 and len(ds) == 3


SCENES = {"name": "scenes", "source": "scenes", "n_concepts": 12, "n_train": 120, "n_val": 20, "n_test": 30,
          "image_size": 32, "zs_per_concept": 1, "max_side": 32}


def test_concept_protocol_edits_training_captions_only(tmp_path):
    from ncu.data.scenes import vocabulary

    data = {**SCENES, "cache_dir": str(tmp_path / "scenes")}
    dm = PairDataModule(data, {"protocol": "concept", "rate": 0.4, "seed": 0}, batch_size=32,
                        noise_dir=str(tmp_path / "noise"))
    dm.setup()
    train, art = dm.datasets["train"], dm.noise_artifact
    assert (train.image_index == np.arange(len(train))).all()  # every caption stays with its own image
    assert train.noisy.sum() == int(0.4 * len(train))
    names = set(vocabulary(12, 3, 0)["caption"])
    for k in range(len(train)):
        caption, edit = train.frame.at[k, "caption"], art.edits[k]
        assert (edit != "") == train.noisy[k]
        assert caption == (edit or caption)
        assert train[k]["caption"] == caption
    # val/test keep their captions: a fresh data module on clean noise reads the same ones
    clean = PairDataModule(data, {"protocol": "none", "rate": 0.0, "seed": 0}, batch_size=32,
                           noise_dir=str(tmp_path / "noise"))
    clean.setup()
    for split in ("val", "test"):
        assert dm.datasets[split].frame["caption"].tolist() == clean.datasets[split].frame["caption"].tolist()
    before = clean.datasets["train"].frame["caption"]
    changed = (train.frame["caption"] != before).to_numpy()
    assert (changed == train.noisy).all()

    def concepts(caption: str) -> list[str]:
        prefixed = caption.startswith(("an icon of", "a picture of", "a drawing of"))
        body = caption.split(" of ", 1)[1] if prefixed else caption
        return [x for part in body.split(", ") for x in part.split(" and ")]

    for k in np.flatnonzero(changed):
        old, new = concepts(before[k]), concepts(train.frame.at[k, "caption"])
        assert set(new) <= names and len(old) == len(new)
        assert sum(a != b for a, b in zip(old, new)) == 1


def _csv(tmp_path, captions, categories=None):
    import pandas as pd
    from PIL import Image

    rows = []
    for i, caption in enumerate(captions):
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append({"image_path": str(tmp_path / f"{i}.png"), "caption": caption,
                     **({"label": categories[i]} if categories else {})})
    pd.DataFrame(rows).to_csv(tmp_path / "pairs.csv", index=False)
    data = {"name": "csv", "source": "csv", "path": str(tmp_path / "pairs.csv"), "image_key": "image_path",
            "caption_key": "caption", "category_key": "label" if categories else None, "val_frac": 0.1,
            "test_frac": 0.2, "max_side": 8}
    return PairDataModule(data, {"protocol": "concept", "rate": 0.4, "seed": 0}, batch_size=16,
                          noise_dir=str(tmp_path / "noise"))


def test_concept_protocol_needs_captions_that_name_a_category(tmp_path):
    from ncu.errors import DataError

    captions = [f"a photo number {i}" for i in range(60)]
    with pytest.raises(DataError, match="no training caption .* names one of its 2 category names"):
        _csv(tmp_path, captions, ["animal", "plant"] * 30).setup()
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="has none .a category column is needed"):
        _csv(tmp_path / "b", captions).setup()


def test_concept_protocol_warns_when_few_captions_name_a_category(tmp_path, caplog):
    # CSV categories in another case than the captions ("Dog" / "a dog"); only 1 in 6 captions names one.
    captions = [f"a dog number {i}" if i % 6 == 0 else f"a photo number {i}" for i in range(60)]
    dm = _csv(tmp_path, captions, ["Dog", "Cat"] * 30)
    with caplog.at_level("WARNING"):
        dm.setup()
    art = dm.noise_artifact
    assert art.meta["editable"] == int(art.noisy_mask.sum()) > 0  # every editable caption edited
    assert "name a category, fewer than" in caplog.text
    assert all(e.startswith("a Cat number") for e in art.edits if e)
