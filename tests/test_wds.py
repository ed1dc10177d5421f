"""Tar shards written here: shard lists, the index pass, exact coverage across ranks/workers, noise."""
from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

import ncu.data.wds as wds
from ncu.data.stats import throughput
from ncu.data.noise import build_or_load, make_noise
from ncu.data.shard_index import build_index
from ncu.data.wds import ShardPairs, expand_shards

N_SHARDS, PER_SHARD = 5, 6


def color_of(i: int) -> tuple[int, int, int]:
    """A colour that encodes a sample number (PNG is lossless, so it can be read back)."""
    return (i % 256, (i * 7) % 256, 255 - i % 256)


def png(i: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    im = Image.new("RGB", (6, 6), color_of(i))
    if mode == "RGBA":
        im = im.convert("RGBA")
        im.putpixel((5, 5), (0, 0, 0, 0))
    im.save(buf, "PNG")
    return buf.getvalue()


def jpeg(size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((size, size), 40).convert("RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def sample_members(i: int, key: str) -> list[tuple[str, bytes]]:
    """Caption styles rotate: .txt, json "caption", json "text"; the image is a PNG coding i."""
    caption = f"caption  of sample {i}"
    if i % 3 == 0:
        cap = [(f"{key}.txt", caption.encode())]
    elif i % 3 == 1:
        cap = [(f"{key}.json", json.dumps({"caption": caption, "url": "x"}).encode())]
    else:
        cap = [(f"{key}.json", json.dumps({"text": caption}).encode())]
    return [(f"{key}.png", png(i, "RGBA" if i % 4 == 0 else "RGB"))] + cap


@pytest.fixture
def shards(tmp_path) -> list[str]:
    paths = []
    for s in range(N_SHARDS):
        members = []
        for j in range(PER_SHARD):
            i = s * PER_SHARD + j
            members += sample_members(i, f"{i:06d}")
        paths.append(str(write_tar(tmp_path / f"shard-{s:05d}.tar", members)))
    return paths


def all_keys() -> list[str]:
    return [f"{i:06d}" for i in range(N_SHARDS * PER_SHARD)]


def sample_id(image: Image.Image) -> int:
    return image.getpixel((0, 0))[0]  # red channel = i (i < 256)


def keys_only(batch: list[dict]) -> list[str]:
    return [item["key"] for item in batch]


# ------------------------------------------------------------------------------------------ shard lists
def test_expand_shards_braces_and_lists(tmp_path):
    assert expand_shards("data/{00000..00003}.tar") == [f"data/{i:05d}.tar" for i in range(4)]
    assert expand_shards("d/{8..11}.tar") == ["d/8.tar", "d/9.tar", "d/10.tar", "d/11.tar"]
    assert expand_shards("d/{08..11}.tar") == ["d/08.tar", "d/09.tar", "d/10.tar", "d/11.tar"]
    assert expand_shards("a.tar::b.tar") == ["a.tar", "b.tar"]
    assert expand_shards("a.tar, b.tar") == ["a.tar", "b.tar"]
    assert expand_shards("cc3m/{0..1}.tar::cc12m/{a,b}.tar") == ["cc3m/0.tar", "cc3m/1.tar", "cc12m/a.tar",
                                                                 "cc12m/b.tar"]
    assert expand_shards("{0..1}-{x,y}.tar") == ["0-x.tar", "0-y.tar", "1-x.tar", "1-y.tar"]
    for name in ("b.tar", "a.tar"):
        (tmp_path / name).write_bytes(b"")
    assert expand_shards(str(tmp_path / "*.tar")) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]


# ----------------------------------------------------------------------------------------------- index
def test_index_pass_and_cache(shards, tmp_path, monkeypatch):
    cache = tmp_path / "index.npz"
    index = build_index(shards, cache_path=cache)
    assert index["key"].tolist() == all_keys()
    assert index["caption"].tolist() == [f"caption of sample {i}" for i in range(N_SHARDS * PER_SHARD)]
    expected_shards = [shards[i // PER_SHARD] for i in range(N_SHARDS * PER_SHARD)]
    assert index["shard"].astype(str).tolist() == expected_shards
    assert cache.exists()

    def no_reading(*a, **k):
        raise AssertionError("the cached index should have been used")

    with monkeypatch.context() as m:
        m.setattr(wds, "iter_samples", no_reading)
        cached = build_index(shards, cache_path=cache)
    assert cached["key"].tolist() == index["key"].tolist()
    assert cached["caption"].tolist() == index["caption"].tolist()
    assert cached["shard"].astype(str).tolist() == index["shard"].astype(str).tolist()
    assert cached.attrs["stats"] == index.attrs["stats"] == {"samples": 30, "no_image": 0, "no_caption": 0,
                                                             "bad_shards": 0, "parquet_shards": 0}
    # A changed shard (size differs) makes the cache stale.
    write_tar(Path(shards[0]), sample_members(0, "000000") + sample_members(99, "extra"))
    rebuilt = build_index(shards, cache_path=cache)
    assert "extra" in set(rebuilt["key"]) and len(rebuilt) == 2 + (N_SHARDS - 1) * PER_SHARD


def test_corrupt_members_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    good = sample_members(1, "good1") + sample_members(2, "good2")
    bad_jpeg = jpeg()
    members = good + [
        ("trunc.jpg", bad_jpeg[: len(bad_jpeg) // 2]), ("trunc.txt", b"truncated jpeg"),
        ("text.jpg", b"not an image at all"), ("text.txt", b"text named jpg"),
        ("nocap.png", png(5)),                       # no caption member
        ("blank.png", png(6)), ("blank.txt", b"   \n"),  # empty caption
        ("noimg.txt", b"caption without image"),
        ("photo.jpg", jpeg(16)), ("photo.json", json.dumps({"caption": "a real jpeg"}).encode()),
    ]
    shard = str(write_tar(tmp_path / "mixed.tar", members))
    index = build_index([shard])
    # Images are not decoded by the index pass: the corrupt ones are listed.
    assert index["key"].tolist() == ["good1", "good2", "trunc", "text", "photo"]
    assert index.attrs["stats"] == {"samples": 8, "no_image": 1, "no_caption": 2, "bad_shards": 0, "parquet_shards": 0}
    ds = ShardPairs([shard], shuffle_shards=False)
    items = list(ds)
    assert [it["key"] for it in items] == ["good1", "good2", "photo"]
    assert all(it["image"].mode == "RGB" for it in items)
    assert ds.skipped == 2 and ds.no_caption == 2 and ds.no_image == 1 and ds.pairs == 3
    assert ds.pairs_per_s > 0

    # A shard cut in the middle: the samples before the cut are read, the shard is counted as unreadable.
    whole = (tmp_path / "mixed.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2 + 100])
    ds = ShardPairs([str(cut)], shuffle_shards=False)
    got = [it["key"] for it in ds]
    assert ds.bad_shards == 1 and got[:2] == ["good1", "good2"]


# -------------------------------------------------------------------------------- coverage across readers
@pytest.mark.parametrize("noise", [False, True])
def test_dataloader_workers_cover_every_sample_once_per_epoch(shards, noise):
    index = build_index(shards) if noise else None
    perm = make_noise(len(index), 0.5, "caption", seed=0, derangement=True)[0] if noise else None
    ds = ShardPairs(shards, index=index, shown_image=perm, seed=3)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=keys_only, persistent_workers=True)
    orders = []
    for epoch in range(2):
        keys = [k for batch in loader for k in batch]
        assert Counter(keys) == Counter(all_keys())
        orders.append(keys)
    # Persistent workers advance the epoch themselves: the shard order changes.
    assert ds.shards_for(0, 0, 1, 0, 1) != ds.shards_for(1, 0, 1, 0, 1)
    assert orders[0] != orders[1]


def test_ranks_and_workers_union_is_exact(shards):
    for epoch in (0, 1):
        seen: Counter = Counter()
        for rank in (0, 1):
            ds = ShardPairs(shards, seed=1, rank=rank, world_size=2)
            ds.set_epoch(epoch)
            loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=keys_only)
            seen.update(k for batch in loader for k in batch)
        assert seen == Counter(all_keys())


def test_shuffle_buffer_reorders_without_loss(shards):
    plain = [it["key"] for it in ShardPairs(shards, shuffle_shards=False)]
    assert plain == all_keys()
    ds = ShardPairs(shards, shuffle_shards=False, shuffle_buffer=8, seed=0)
    mixed = [it["key"] for it in ds]
    assert Counter(mixed) == Counter(plain) and mixed != plain
    assert mixed != [it["key"] for it in ds]  # the next epoch draws another order


def test_throughput_helper(shards):
    loader = DataLoader(ShardPairs(shards), batch_size=5, collate_fn=keys_only)
    out = throughput(loader)
    assert out["pairs"] == N_SHARDS * PER_SHARD and out["pairs_per_s"] > 0


# ---------------------------------------------------------------------------------------------- noise
def test_noise_map_shows_the_permuted_image(shards):
    index = build_index(shards)
    n = len(index)
    perm, noisy = make_noise(n, 0.5, "caption", seed=2, derangement=True)
    ds = ShardPairs(shards, index=index, shown_image=perm)
    items = list(ds)
    assert len(items) == n and sorted(it["index"] for it in items) == list(range(n))
    for it in items:
        k = it["index"]
        own = int(it["key"])  # keys are the sample numbers
        assert it["key"] == index["key"][k] and it["caption"] == index["caption"][k]
        assert sample_id(it["image"]) == perm[k]  # the pixels are those of the permuted image
        assert it["image_key"] == index["key"][perm[k]]
        assert it["noisy"] == bool(noisy[k])
        if it["noisy"]:
            assert sample_id(it["image"]) != own
        else:
            assert sample_id(it["image"]) == own
    assert sum(it["noisy"] for it in items) == n // 2

    # The same noise given as a key -> shown-image-key mapping gives the same pairs.
    keys = index["key"].tolist()
    mapping = {keys[k]: keys[perm[k]] for k in range(n)}
    pairs = {(it["key"], it["image_key"]) for it in ShardPairs(shards, index=index, shown_image=mapping)}
    assert pairs == {(it["key"], it["image_key"]) for it in items}


def test_random_replace_noise_yields_each_caption_once(shards):
    index = build_index(shards)
    n = len(index)
    perm, _ = make_noise(n, 0.8, "random_replace", seed=0)
    assert len(set(perm)) < n  # some images carry several captions, some none
    items = list(ShardPairs(shards, index=index, shown_image=perm))
    assert Counter(it["index"] for it in items) == Counter(range(n))
    assert all(sample_id(it["image"]) == perm[it["index"]] for it in items)


def test_from_artifact_checks_keys(shards, tmp_path):
    index = build_index(shards)
    art, _, _ = build_or_load(tmp_path, "shards", index["key"].tolist(), index["caption"].tolist(), 0.4)
    ds = ShardPairs.from_artifact(index, art)
    assert sum(it["noisy"] for it in ds) == art.noisy_mask.sum()
    other, _, _ = build_or_load(tmp_path, "other", [f"x{i}" for i in range(len(index))], None, 0.4)
    with pytest.raises(ValueError, match="other keys"):
        ShardPairs.from_artifact(index, other)
    with pytest.raises(ValueError, match="index"):
        ShardPairs(shards, shown_image={"000000": "000001"})


def test_parquet_beside_a_shard_is_the_index_without_reading_the_tar(shards, monkeypatch):
    import pandas as pd

    from_tars = build_index(shards)
    for s, shard in enumerate(shards):  # img2dataset's table: every attempted sample, with its status
        keys = [f"{s * PER_SHARD + j:06d}" for j in range(PER_SHARD)]
        pd.DataFrame({"key": keys + ["failed"], "caption": [f"caption  of sample {int(k)}" for k in keys] + ["x"],
                      "status": ["success"] * PER_SHARD + ["failed_to_download"]}
                     ).to_parquet(Path(shard).with_suffix(".parquet"), index=False)

    def no_reading(*a, **k):
        raise AssertionError("the parquet tables should have been used")

    with monkeypatch.context() as m:
        m.setattr(wds, "iter_samples", no_reading)
        from_tables = build_index(shards)
    assert from_tables["key"].tolist() == from_tars["key"].tolist() == all_keys()
    assert from_tables["caption"].tolist() == from_tars["caption"].tolist()
    assert from_tables["shard"].astype(str).tolist() == from_tars["shard"].astype(str).tolist()
    assert from_tables.attrs["stats"]["parquet_shards"] == N_SHARDS
    assert build_index(shards, use_parquet=False).attrs["stats"]["parquet_shards"] == 0


# ------------------------------------------------------------------------------ webdataset: URLs, resampling
def test_pipe_urls_read_the_same_pairs_and_index_as_local_files(shards, tmp_path):
    """``pipe:cat <shard>`` (as ``pipe:aws s3 cp ... -`` or ``pipe:curl``): webdataset runs the command and reads
    its output; the index, the noise map and the pairs are those of the local files. A failing command is
    one unreadable shard, counted, and the epoch goes on."""
    folder = tmp_path
    spec = f"pipe:cat {folder}/shard-{{00000..{N_SHARDS - 1:05d}}}.tar"
    urls = expand_shards(spec)
    assert urls == [f"pipe:cat {s}" for s in shards]
    local, piped = build_index(shards), build_index(urls)
    assert piped["key"].tolist() == local["key"].tolist() and piped["caption"].tolist() == local["caption"].tolist()
    perm = make_noise(len(local), 0.5, "caption", seed=0, derangement=True)[0]
    got = [(it["key"], it["image_key"], it["caption"]) for it in
           ShardPairs(urls, index=piped, shown_image=perm, shuffle_shards=False)]
    want = [(it["key"], it["image_key"], it["caption"]) for it in
            ShardPairs(shards, index=local, shown_image=perm, shuffle_shards=False)]
    assert sorted(got) == sorted(want) and len(got) == len(all_keys())
    broken = ShardPairs([urls[0], f"pipe:cat {folder}/missing.tar"], shuffle_shards=False)
    assert len(list(broken)) == PER_SHARD and broken.bad_shards == 1


def test_resampled_shards_give_samples_per_epoch_pairs_drawn_by_weight(shards):
    """Resampled: each reader draws shards with replacement until its share of samples_per_epoch; the draw
    is fixed by (seed, epoch, rank, worker) and changes with the epoch; per-shard weights set how often
    each shard is drawn (here one shard has all the weight but a sliver)."""
    n = 3 * PER_SHARD * N_SHARDS + 5
    ds = ShardPairs(shards, seed=2, samples_per_epoch=n)
    first = [it["key"] for it in ds]
    assert len(first) == n and ds.shards_read >= 3 * N_SHARDS
    second = [it["key"] for it in ds]
    assert len(second) == n and second != first  # the next epoch draws again
    again = ShardPairs(shards, seed=2, samples_per_epoch=n)
    assert [it["key"] for it in again] == first  # the same seed and epoch: the same draw
    # Two ranks x two workers: each reader takes ceil(n / 4) pairs.
    per_reader = -(-n // 4)
    for rank in (0, 1):
        loader = DataLoader(ShardPairs(shards, seed=2, samples_per_epoch=n, rank=rank, world_size=2),
                            batch_size=1, num_workers=2, collate_fn=keys_only)
        assert len([k for batch in loader for k in batch]) == 2 * per_reader
    weights = [1000.0] + [1e-9] * (N_SHARDS - 1)
    heavy = ShardPairs(shards, seed=0, samples_per_epoch=4 * PER_SHARD, weights=weights)
    keys = Counter(it["key"] for it in heavy)
    assert set(keys) == set(all_keys()[:PER_SHARD]) and all(c == 4 for c in keys.values())
