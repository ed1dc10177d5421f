"""Noise protocols: realised rates, structure of each corruption, determinism, artifacts."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from ncu.data.noise import PROTOCOLS, TEXT_PROTOCOLS, NoiseArtifact, build_or_load, make_noise, replace_concepts

# The protocols that move captions to other images (make_noise); `concept` edits them (replace_concepts).
MOVING = [p for p in PROTOCOLS if p not in TEXT_PROTOCOLS]

FRUIT = ["apple", "banana", "cherry", "grape", "mango", "pear", "plum", "melon"]
CARS = ["car", "truck", "bus", "tractor", "scooter", "van", "taxi", "lorry"]


def two_topic_captions(n_per_topic: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Captions from two disjoint vocabularies, interleaved at random; topic id per caption."""
    rng = np.random.default_rng(seed)
    caps, topic = [], []
    for t, words in enumerate((FRUIT, CARS)):
        marker = "fruit basket" if t == 0 else "vehicle road"
        for _ in range(n_per_topic):
            caps.append(f"{marker} " + " ".join(rng.choice(words, size=3)))
            topic.append(t)
    order = rng.permutation(len(caps))
    return [caps[i] for i in order], np.asarray(topic)[order]


def test_caption_protocol_rate_and_image_counts():
    n, cpi, r = 1000, 5, 0.3
    perm, noisy = make_noise(n, r, "caption", seed=1, captions_per_image=cpi)
    t2i = np.arange(n) // cpi
    np.testing.assert_array_equal(noisy, perm != t2i)
    target = math.floor(r * n)
    # Fixed points (a caption landing on its own image) only lower the rate.
    assert target - 40 <= noisy.sum() <= target
    # A permutation of image ids among captions: every image keeps its number of captions.
    np.testing.assert_array_equal(np.bincount(perm, minlength=n // cpi), np.full(n // cpi, cpi))


@pytest.mark.parametrize("protocol,cpi", [("caption", 1), ("caption", 5), ("image", 1), ("random_replace", 1),
                                          ("random_replace", 5)])
def test_derangement_realises_exactly_floor_rate(protocol, cpi):
    n, r = 1000, 0.37
    perm, noisy = make_noise(n, r, protocol, seed=3, captions_per_image=cpi, derangement=True)
    assert noisy.sum() == math.floor(r * n)
    np.testing.assert_array_equal(noisy, perm != np.arange(n) // cpi)


def test_image_protocol_moves_all_captions_of_an_image_together():
    n, cpi, r = 500, 5, 0.4
    perm, noisy = make_noise(n, r, "image", seed=2, captions_per_image=cpi)
    per_image = perm.reshape(-1, cpi)
    assert (per_image == per_image[:, :1]).all()  # the five captions go to one image
    image_perm = per_image[:, 0]
    assert sorted(image_perm) == list(range(n // cpi))  # a permutation of images
    moved = image_perm != np.arange(n // cpi)
    assert moved.sum() <= math.floor(r * n // cpi)
    np.testing.assert_array_equal(noisy.reshape(-1, cpi).all(1), moved)
    np.testing.assert_array_equal(noisy.reshape(-1, cpi).any(1), moved)
    _, noisy_d = make_noise(n, r, "image", seed=2, captions_per_image=cpi, derangement=True)
    assert noisy_d.sum() == math.floor(r * (n // cpi)) * cpi


def test_random_replace_draws_from_corpus():
    n, r = 1000, 0.5
    perm, noisy = make_noise(n, r, "random_replace", seed=0)
    assert noisy.sum() <= math.floor(r * n)
    assert ((0 <= perm) & (perm < n)).all()
    assert len(np.unique(perm)) < n  # i.i.d. draws repeat images: not a permutation
    np.testing.assert_array_equal(perm[~noisy], np.arange(n)[~noisy])


@pytest.mark.parametrize("n_clusters", [2, 6])
@pytest.mark.parametrize("derangement", [False, True])
def test_semantic_swaps_only_within_topics(n_clusters, derangement):
    caps, topic = two_topic_captions(60)
    n, r = len(caps), 0.5
    perm, noisy = make_noise(n, r, "semantic", seed=0, captions=caps, n_clusters=n_clusters,
                             derangement=derangement)
    assert noisy.sum() > 0.3 * n
    assert noisy.sum() <= math.floor(r * n)
    # One caption per image: perm[k] is also the caption index whose image is shown.
    np.testing.assert_array_equal(topic[perm], topic)
    assert sorted(perm) == list(range(n))
    # Control: the plain caption protocol on the same data crosses topics, so the check above can fail.
    perm_c, _ = make_noise(n, r, "caption", seed=0)
    assert (topic[perm_c] != topic).sum() > 5


def test_semantic_derangement_exact_when_clusters_hold_several_selected():
    caps, _ = two_topic_captions(60)
    _, noisy = make_noise(len(caps), 0.5, "semantic", seed=4, captions=caps, n_clusters=2, derangement=True)
    assert noisy.sum() == math.floor(0.5 * len(caps))


def test_semantic_lone_caption_in_its_cluster_stays_clean():
    # Three distinct texts and three clusters: the lone caption is a cluster of its own.
    caps = ["fruit basket apple banana"] * 40 + ["vehicle road car bus"] * 40 + ["zebra stripes savanna"]
    lone = len(caps) - 1
    lone_noisy = [make_noise(len(caps), 0.9, "semantic", seed=s, captions=caps, n_clusters=3)[1][lone]
                  for s in range(6)]
    assert not any(lone_noisy)
    # Under the plain protocol the same caption is corrupted for some of these seeds.
    assert any(make_noise(len(caps), 0.9, "caption", seed=s)[1][lone] for s in range(6))


def test_semantic_needs_captions():
    with pytest.raises(ValueError, match="captions"):
        make_noise(10, 0.5, "semantic")
    with pytest.raises(ValueError, match="captions"):
        make_noise(10, 0.5, "semantic", captions=["a b"] * 9)


@pytest.mark.parametrize("protocol", [p for p in MOVING if p != "none"])
def test_deterministic_by_seed_and_changes_with_seed(protocol):
    caps, _ = two_topic_captions(100)
    kw = {"captions": caps} if protocol == "semantic" else {}
    a = make_noise(200, 0.4, protocol, seed=7, **kw)[0]
    b = make_noise(200, 0.4, protocol, seed=7, **kw)[0]
    c = make_noise(200, 0.4, protocol, seed=8, **kw)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("protocol", [p for p in MOVING if p != "none"])
def test_independent_of_training_seed(protocol):
    caps, _ = two_topic_captions(100)
    kw = {"captions": caps} if protocol == "semantic" else {}
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    a = make_noise(200, 0.4, protocol, seed=5, **kw)
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    np.random.rand(17), random.random(), torch.rand(3)  # consume global streams too
    b = make_noise(200, 0.4, protocol, seed=5, **kw)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_positional_signature_kept():
    perm, noisy = make_noise(100, 0.2, "caption", 3, 1, True)
    assert noisy.sum() == 20


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, "a"])
def test_invalid_rate(rate, tmp_path):
    with pytest.raises(ValueError, match="noise.rate"):
        make_noise(10, rate)
    with pytest.raises(ValueError, match="noise.rate"):
        build_or_load(tmp_path, "d", [str(i) for i in range(10)], None, rate)


@pytest.mark.parametrize("protocol", MOVING)
def test_clean_when_none_or_zero_rate(protocol):
    caps = [f"caption {i}" for i in range(50)]
    for p, r in ((protocol, 0.0), ("none", 0.6)):
        perm, noisy = make_noise(50, r, p, seed=1, captions_per_image=5, captions=caps)
        np.testing.assert_array_equal(perm, np.arange(50) // 5)
        assert not noisy.any()


@pytest.mark.parametrize("protocol", ["caption", "semantic"])
def test_artifact_reuse_and_fingerprint_refusal(tmp_path, protocol):
    caps, _ = two_topic_captions(50)
    keys = [f"k{i:04d}" for i in range(len(caps))]
    a, folder, reused = build_or_load(tmp_path, "toy", keys, caps, 0.3, protocol, seed=2)
    assert not reused
    assert (folder / "perm.npy").exists() and (folder / "noisy_mask.npy").exists()
    b, folder_b, reused_b = build_or_load(tmp_path, "toy", keys, caps, 0.3, protocol, seed=2)
    assert reused_b and folder_b == folder
    np.testing.assert_array_equal(a.perm, b.perm)
    np.testing.assert_array_equal(a.noisy_mask, b.noisy_mask)
    assert b.meta["realised_rate"] == pytest.approx(a.noisy_mask.mean())
    text_rate = np.mean(np.asarray(caps, dtype=object)[a.perm] != np.asarray(caps, dtype=object))
    assert b.meta["realised_text_rate"] == pytest.approx(text_rate)
    other = [f"z{i:04d}" for i in range(len(caps))]
    with pytest.raises(ValueError, match="another dataset.*fingerprint"):
        build_or_load(tmp_path, "toy", other, caps, 0.3, protocol, seed=2)


def test_semantic_artifact_requires_captions(tmp_path):
    with pytest.raises(ValueError, match="captions"):
        build_or_load(tmp_path, "toy", [str(i) for i in range(20)], None, 0.3, "semantic")


CONCEPTS = ["cat", "cat face", "dog", "tent", "bell", "red apple"]


def scene_captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        names = [CONCEPTS[j] for j in rng.choice(len(CONCEPTS), size=int(rng.integers(1, 4)), replace=False)]
        body = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        out.append(("an icon of " if i % 3 == 0 else "") + body)
    return out + ["a blank canvas"] * (n // 10)  # captions naming no concept can never be edited


def named(caption: str) -> list[str]:
    """The concepts a scene caption names, read back independently: split the list on ', ' and ' and '."""
    body = caption.removeprefix("an icon of ")
    return [part for chunk in body.split(", ") for part in chunk.split(" and ")]


def test_concept_protocol_replaces_exactly_one_named_concept():
    caps = scene_captions(300)
    edits = replace_concepts(caps, 0.4, seed=3, concepts=CONCEPTS)
    edited = np.flatnonzero(edits != "")
    assert len(edited) == math.floor(0.4 * len(caps))
    for k in edited:
        before, after = named(caps[k]), named(edits[k])
        assert len(before) == len(after) and caps[k].startswith("an icon of ") == edits[k].startswith("an icon of ")
        changed = [(a, b) for a, b in zip(before, after) if a != b]
        assert len(changed) == 1, (caps[k], edits[k])
        old, new = changed[0]
        assert new in CONCEPTS and new not in before  # another concept, one the caption did not name
    assert all(edits[k] == "" for k in range(len(caps)) if caps[k] == "a blank canvas")
    np.testing.assert_array_equal(edits, replace_concepts(caps, 0.4, seed=3, concepts=CONCEPTS))
    assert not np.array_equal(edits, replace_concepts(caps, 0.4, seed=4, concepts=CONCEPTS))


def test_concept_protocol_reads_the_longest_name():
    # "cat face" is one concept: replacing "cat" inside it would leave a caption naming "X face".
    caps = ["cat face"] * 50
    edits = replace_concepts(caps, 0.5, seed=0, concepts=CONCEPTS)
    assert all(e in CONCEPTS and e != "cat face" for e in edits if e)


def test_concept_artifact_round_trip_and_training_captions(tmp_path):
    caps = scene_captions(120)
    keys = [f"k{i:04d}" for i in range(len(caps))]
    art, folder, reused = build_or_load(tmp_path, "toy", keys, caps, 0.3, "concept", seed=1, concepts=CONCEPTS)
    assert not reused and (folder / "edits.npy").exists()
    np.testing.assert_array_equal(art.perm, np.arange(len(caps)))  # every image stays with its caption
    shown = art.captions(caps)
    np.testing.assert_array_equal(art.noisy_mask, shown != np.asarray(caps, dtype=object))
    assert art.meta["realised_text_rate"] == pytest.approx(art.noisy_mask.mean())
    again = NoiseArtifact.load(folder)
    np.testing.assert_array_equal(again.captions(caps), shown)
    # An edit changed after writing is refused by the recorded hash, as the other files are.
    np.save(folder / "edits.npy", np.asarray(["x"] * len(caps)))
    with pytest.raises(ValueError, match="edits.npy differs"):
        NoiseArtifact.load(folder)


def test_concept_protocol_matches_whole_words_in_any_case_and_replaces_every_mention():
    concepts = ["cat", "shirt", "bell"]
    caps = ["a cat chasing another Cat", "a t-shirt and a bell", "category of things", "bell"]
    edits = replace_concepts(caps, 0.99, seed=0, concepts=concepts)
    assert edits[2] == ""  # "category" names no concept
    assert "cat" not in edits[0].lower().split() and edits[0].count(edits[0].split()[1]) == 2  # both mentions
    assert edits[1].startswith("a t-shirt and a ")  # the hyphenated word is not "shirt"
    assert edits[3] in ("cat", "shirt")


def test_concept_artifact_needs_captions_and_refuses_derangement(tmp_path):
    keys = [f"k{i}" for i in range(10)]
    with pytest.raises(ValueError, match="needs the caption texts"):
        build_or_load(tmp_path, "toy", keys, None, 0.3, "concept", concepts=CONCEPTS)
    with pytest.raises(ValueError, match="derangement does not apply"):
        build_or_load(tmp_path, "toy", keys, ["cat"] * 10, 0.3, "concept", derangement=True, concepts=CONCEPTS)
