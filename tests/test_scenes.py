"""The composed-scene benchmark: deterministic, concepts recur, val/test are fresh and unique, zero-shot set."""
from __future__ import annotations

import collections
import os

import numpy as np
import pytest
from PIL import Image

from ncu.data.scenes import caption_of, params_of, scene_key, scene_pairs, vocabulary

SMALL = {"n_concepts": 12, "n_train": 120, "n_val": 20, "n_test": 30, "image_size": 32, "zs_per_concept": 2}


def test_caption_lists_names_left_to_right():
    assert caption_of(["cat"], "") == "cat"
    assert caption_of(["cat", "tent"], "an icon of ") == "an icon of cat and tent"
    assert caption_of(["cat", "tent", "bell"], "") == "cat, tent and bell"


def test_vocabulary_has_distinct_unambiguous_names():
    vocab = vocabulary(40, 3, seed=0)
    names = vocab["caption"].tolist()
    assert len(set(names)) == 40
    assert not any(" and " in n or "," in n or ":" in n for n in names)
    assert all(len(n.split()) <= 3 for n in names)
    assert vocabulary(40, 3, seed=0)["key"].tolist() == vocab["key"].tolist()
    assert vocabulary(40, 3, seed=1)["key"].tolist() != vocab["key"].tolist()


def test_scenes_are_cached_deterministic_and_well_formed(tmp_path):
    a = scene_pairs(SMALL, tmp_path / "a")
    b = scene_pairs(SMALL, tmp_path / "b")
    assert a.drop(columns="image").equals(b.drop(columns="image"))
    for pa, pb in zip(a["image"][:5], b["image"][:5]):  # same pixels from two independent generations
        assert np.array_equal(np.asarray(Image.open(pa)), np.asarray(Image.open(pb)))
    again = scene_pairs(SMALL, tmp_path / "a")  # reused, not regenerated
    assert again.attrs["folder"] == a.attrs["folder"]
    assert len(list((tmp_path / "a").iterdir())) == 1

    counts = a["split"].value_counts().to_dict()
    assert counts == {"train": 120, "val": 20, "test": 30, "zeroshot": 24}
    names = set(vocabulary(12, 3, 0)["caption"])
    body = a["caption"].str.replace(r"^(an icon of|a picture of|a drawing of) ", "", regex=True)
    concepts = body.map(lambda c: tuple(x for part in c.split(", ") for x in part.split(" and ")))
    assert all(set(c) <= names for c in concepts)
    # Concepts recur in training; val/test compositions are new and each caption occurs once in its split.
    train = concepts[a["split"] == "train"]
    per_concept = collections.Counter(x for c in train for x in c)
    assert min(per_concept.values()) >= 5
    for split in ("val", "test"):
        part = concepts[a["split"] == split]
        assert part.map(len).min() >= 2
        assert not set(part) & set(train)
        assert part.is_unique
    assert not set(concepts[a["split"] == "val"]) & set(concepts[a["split"] == "test"])
    zs = a[a["split"] == "zeroshot"]
    assert set(zs["category"]) == names and (zs["caption"] == zs["category"]).all()
    with Image.open(a["image"].iloc[0]) as im:
        assert im.size == (32, 32)


def test_generation_parameters_key_the_cache_and_are_checked():
    assert scene_key(params_of(SMALL)) != scene_key(params_of({**SMALL, "seed": 1}))
    with pytest.raises(ValueError, match="n_train"):
        params_of({"n_train": 0})
    with pytest.raises(ValueError, match="prefix_prob"):
        params_of({"prefix_prob": 2})


def test_a_killed_generation_leaves_no_partial_folder_behind(tmp_path):
    import socket
    import subprocess

    folder = f"scenes-{scene_key(params_of(SMALL))}"
    host = socket.gethostname()
    dead_pid = subprocess.Popen(["true"])  # a process that has exited: its pid is free
    dead_pid.wait()
    stale = tmp_path / f".{folder}.{host}.{dead_pid.pid}.abc123"
    live = tmp_path / f".{folder}.{host}.{os.getpid()}.def456"  # a generation still running
    elsewhere = tmp_path / f".{folder}.other-host.{dead_pid.pid}.ghi789"  # another node of a shared disk
    for path in (stale, live, elsewhere):
        (path / "images").mkdir(parents=True)
    scene_pairs(SMALL, tmp_path)
    assert not stale.exists() and live.exists() and elsewhere.exists()
    assert (tmp_path / folder / "pairs.csv").exists()


def test_a_killed_concurrent_generation_is_cleaned_up_by_a_later_use_of_the_finished_set(tmp_path):
    import socket
    import subprocess

    scene_pairs(SMALL, tmp_path)  # the set exists: later uses do not generate
    folder = f"scenes-{scene_key(params_of(SMALL))}"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".{folder}.{socket.gethostname()}.{dead.pid}.abc123"
    live = tmp_path / f".{folder}.{socket.gethostname()}.{os.getpid()}.def456"
    for path in (stale, live):
        (path / "images").mkdir(parents=True)
    scene_pairs(SMALL, tmp_path)
    assert not stale.exists() and live.exists()


def test_train_size_keeps_the_evaluation_sets_of_n_train(tmp_path):
    base = scene_pairs(SMALL, tmp_path)
    fewer = scene_pairs({**SMALL, "train_size": 50}, tmp_path)
    more = scene_pairs({**SMALL, "train_size": 200}, tmp_path)
    assert scene_key(params_of(SMALL)) == scene_key(params_of({**SMALL, "train_size": None}))  # old caches valid
    cols = ["key", "caption", "category", "split"]

    def split(frame, name):
        return frame[frame["split"] == name].reset_index(drop=True)

    def same_files(a, b) -> bool:
        return all(open(x, "rb").read() == open(y, "rb").read() for x, y in zip(a["image"], b["image"]))

    for name in ("val", "test", "zeroshot"):  # the same pairs and the same image files
        assert split(fewer, name)[cols].equals(split(base, name)[cols])
        assert split(more, name)[cols].equals(split(base, name)[cols])
        assert same_files(split(more, name), split(base, name)) and same_files(split(fewer, name), split(base, name))
    train = split(base, "train")
    assert same_files(split(more, "train").iloc[:120], train) and same_files(split(fewer, "train"), train.iloc[:50])
    # sizes above n_train nest: the pairs of 160 are the first 160 of 200
    mid = split(scene_pairs({**SMALL, "train_size": 160}, tmp_path), "train")
    assert mid[cols].equals(split(more, "train")[cols].iloc[:160]) and same_files(mid, split(more, "train"))
    assert scene_key(params_of({**SMALL, "train_size": 120})) == scene_key(params_of(SMALL))  # = n_train: same set
    assert split(fewer, "train")[cols].equals(train[cols].iloc[:50])
    extra = split(more, "train")
    assert len(extra) == 200 and extra[cols].iloc[:120].equals(train[cols])
    # the added compositions are new draws, never an evaluation composition
    evaluation = set(base.loc[base["split"].isin(["val", "test"]), "caption"].str.replace(
        r"^(an icon of|a picture of|a drawing of) ", "", regex=True))
    added = extra["caption"].iloc[120:].str.replace(r"^(an icon of|a picture of|a drawing of) ", "", regex=True)
    assert not set(added) & evaluation and extra["key"].is_unique
    with pytest.raises(ValueError, match="data.train_size"):
        params_of({**SMALL, "train_size": 0})
