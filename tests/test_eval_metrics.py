from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from ncu.eval.detection import NCDetectionMeter, detection_metrics
from ncu.eval.retrieval import retrieval_metrics
from ncu.eval.zeroshot import zero_shot_accuracy, zero_shot_classifier

# ---------------------------------------------------------------------------------------------- retrieval


def _hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 images on the axes e0, e1, e2; 6 captions, 2 per image, with exactly representable similarities.
    Ties are broken at random in expectation: (above g, tied e) counts R@K as clip((K - g) / (e + 1), 0, 1).

    caption -> image sims (rows: captions c0..c5, cols: images 0..2)
        c0 (img 0) = e0                 [1,    0,    0  ]  g=0 e=0: R@1 1
        c1 (img 0) = (e0 + e1)/sqrt2    [.707, .707, 0  ]  g=0 e=1 (tie with image 1): R@1 1/2, R@2 1
        c2 (img 1) = e0                 [1,    0,    0  ]  g=1 e=1 (image 0 above, tie with 2): R@1 0, R@2 1/2
        c3 (img 1) = .6 e1 + .8 e2      [0,    .6,   .8 ]  g=1 e=0: R@1 0
        c4 (img 2) = e2                 [0,    0,    1  ]  g=0 e=0: R@1 1
        c5 (img 2) = .8 e0 + .6 e2      [.8,   0,    .6 ]  g=1 e=0: R@1 0
    image -> caption:
        img 0: [1, .707, 1, 0, 0, .8]  best truth c0 = 1, tie with c2 (image 1's): g=0 e=1, R@1 1/2
        img 1: [0, .707, 0, .6, 0, 0]  best truth is the SECOND caption c3 = .6, c1 above: g=1 e=0
        img 2: [0, 0, 0, .8, 1, .6]    best truth c4 = 1: g=0 e=0
    """
    images = torch.eye(3)
    s = 1.0 / math.sqrt(2.0)
    texts = torch.tensor(
        [[1, 0, 0], [s, s, 0], [1, 0, 0], [0, 0.6, 0.8], [0, 0, 1], [0.8, 0, 0.6]], dtype=torch.float32
    )
    text_to_image = torch.tensor([0, 0, 1, 1, 2, 2])
    return images, texts, text_to_image


@pytest.mark.parametrize("chunk_size", [1, 2, 1024])
def test_retrieval_hand_computed(chunk_size: int) -> None:
    images, texts, t2i = _hand_case()
    m = retrieval_metrics(images, texts, t2i, ks=(1, 5, 10), chunk_size=chunk_size)
    # i2t R@1 (1/2 + 0 + 1) / 3; t2i R@1 (1 + 1/2 + 0 + 0 + 1 + 0) / 6.
    assert m["i2t_R@1"] == pytest.approx(50.0)
    assert m["i2t_R@5"] == 100.0 and m["i2t_R@10"] == 100.0
    assert m["t2i_R@1"] == pytest.approx(250.0 / 6.0)
    assert m["t2i_R@5"] == 100.0 and m["t2i_R@10"] == 100.0
    assert m["rsum"] == pytest.approx(50.0 + 250.0 / 6.0 + 400.0)
    # mid-ranks g + e/2: i2t [.5, 1, 0] (median .5 -> floored -> 1-based 1); t2i [0, .5, 1.5, 1, 0, 1]
    # (median .75 -> 1)
    assert m["i2t_medr"] == 1.0
    assert m["t2i_medr"] == 1.0
    assert m["i2t_meanr"] == pytest.approx(4.5 / 3.0)
    assert m["t2i_meanr"] == pytest.approx(10.0 / 6.0)


def test_retrieval_custom_ks() -> None:
    images, texts, t2i = _hand_case()
    m = retrieval_metrics(images, texts, t2i, ks=(2,))
    assert set(m) == {"i2t_R@2", "t2i_R@2", "rsum", "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr"}
    # i2t R@2 = 100; t2i R@2: c2 (g=1, e=1) counts (2 - 1) / 2, every other caption 1.
    assert m["i2t_R@2"] == 100.0 and m["t2i_R@2"] == pytest.approx(550.0 / 6.0)
    assert m["rsum"] == pytest.approx(100.0 + 550.0 / 6.0)
    # Moving caption c2 onto its own image e1 makes it rank 0 both ways and removes image 0's tie:
    # t2i R@1 (1 + 1/2 + 1 + 0 + 1 + 0) / 6, every image's best truth first.
    texts2 = texts.clone()
    texts2[2] = torch.tensor([0.0, 1.0, 0.0])
    m2 = retrieval_metrics(images, texts2, t2i, ks=(1,))
    assert m2["t2i_R@1"] == pytest.approx(350.0 / 6.0)
    assert m2["i2t_R@1"] == pytest.approx(100.0)


@pytest.mark.parametrize("features", ["constant", "nan"])
def test_a_collapsed_model_scores_at_chance_not_perfect(features):
    """Every score tied (constant features; NaN features, all -inf): R@K is K / candidates, mean rank the
    middle, whatever the ground truth. Counting only strictly greater scores would give R@1 = 100."""
    n, dim = 20, 4
    make = torch.ones if features == "constant" else (lambda *shape: torch.full(shape, float("nan")))
    images, texts = make(n, dim), make(2 * n, dim)
    t2i = torch.arange(n).repeat(2)
    m = retrieval_metrics(images, texts, t2i, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert m[f"t2i_R@{k}"] == pytest.approx(100.0 * k / n)  # k of n images
        # 2 captions of the image tie with the 2n - 2 others: the block of 2n - 1 answers, 1 of them right
        assert m[f"i2t_R@{k}"] == pytest.approx(100.0 * k / (2 * n - 1))
    assert m["t2i_meanr"] == pytest.approx((n + 1) / 2)
    assert m["rsum"] == pytest.approx(sum(100.0 * k / n + 100.0 * k / (2 * n - 1) for k in (1, 5, 10)))  # 121


def test_nan_scores_rank_below_every_number():
    images, texts, t2i = _hand_case()
    texts = texts.clone()
    texts[0] = float("nan")  # c0 (image 0) scores NaN against every image: all of them tie at the bottom
    m = retrieval_metrics(images, texts, t2i, ks=(1,))
    # c0: g=0, e=2 -> R@1 1/3 (was 1); the other captions are unchanged
    assert m["t2i_R@1"] == pytest.approx((1 / 3 + 0.5 + 0 + 0 + 1 + 0) / 6 * 100.0)


def test_retrieval_rejects_uncaptioned_images() -> None:
    images, texts, _ = _hand_case()
    with pytest.raises(ValueError, match="1 of 3 images have no caption"):
        retrieval_metrics(images, texts, torch.tensor([0, 0, 1, 1, 1, 1]))


def _dense_reference(images: torch.Tensor, texts: torch.Tensor, t2i: torch.Tensor) -> dict[str, float]:
    """Full similarity matrix and argsort; position in the sorted list is the 0-based rank."""
    sims = (images.double() @ texts.double().T).numpy()  # (M, T)
    t2i_np = t2i.numpy()
    i2t_ranks = []
    for i in range(sims.shape[0]):
        order = np.argsort(-sims[i], kind="stable")
        positions = np.nonzero(np.isin(order, np.nonzero(t2i_np == i)[0]))[0]
        i2t_ranks.append(positions.min())
    t2i_ranks = []
    for t in range(sims.shape[1]):
        order = np.argsort(-sims[:, t], kind="stable")
        t2i_ranks.append(int(np.nonzero(order == t2i_np[t])[0][0]))
    out = {}
    for name, ranks in (("i2t", np.array(i2t_ranks)), ("t2i", np.array(t2i_ranks))):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = 100.0 * float(np.mean(ranks < k))
        out[f"{name}_medr"] = float(np.floor(np.median(ranks)) + 1)
        out[f"{name}_meanr"] = float(np.mean(ranks + 1))
    out["rsum"] = sum(out[f"{n}_R@{k}"] for n in ("i2t", "t2i") for k in (1, 5, 10))
    return out


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_retrieval_chunked_matches_dense_reference(chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    num_images, caps, dim = 40, 3, 8
    # Noisy pairing so the ranks are spread (some beyond 10).
    images = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=gen), dim=1)
    t2i = torch.arange(num_images).repeat_interleave(caps)
    t2i = t2i[torch.randperm(t2i.numel(), generator=gen)]
    texts = images[t2i] + 1.2 * torch.randn(t2i.numel(), dim, generator=gen)
    texts = torch.nn.functional.normalize(texts, dim=1)
    expected = _dense_reference(images, texts, t2i)
    got = retrieval_metrics(images, texts, t2i, chunk_size=chunk_size)
    assert 0.0 < expected["t2i_R@1"] < 100.0 and expected["t2i_R@10"] < 100.0  # non-trivial case
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


# ---------------------------------------------------------------------------------------------- zero-shot


def test_zero_shot_accuracy_explicit() -> None:
    # 3 classes along the axes of a 3-d space plus a 4th class; 4 images.
    classifier = torch.tensor(
        [[1.0, 0.0, 0.0, 0.5], [0.0, 1.0, 0.0, 0.5], [0.0, 0.0, 1.0, 0.0]]
    )  # (d=3, C=4)
    images = torch.tensor(
        [
            [1.0, 0.1, 0.0],  # logits [1, .1, 0, .55]    -> order 0, 3, 1, 2
            [0.0, 1.0, 0.2],  # logits [0, 1, .2, .5]     -> order 1, 3, 2, 0
            [0.9, 0.8, 0.0],  # logits [.9, .8, 0, .85]   -> order 0, 3, 1, 2
            [0.1, 0.0, 1.0],  # logits [.1, 0, 1, .05]    -> order 2, 0, 3, 1
        ]
    )
    labels = torch.tensor([0, 3, 1, 1])
    # label positions (1-based): 1, 2, 3, 4
    acc = zero_shot_accuracy(images, labels, classifier, topk=(1, 2, 3, 5))
    assert acc["top1"] == pytest.approx(25.0)
    assert acc["top2"] == pytest.approx(50.0)
    assert acc["top3"] == pytest.approx(75.0)
    assert acc["top5"] == pytest.approx(100.0)  # capped at C=4


class _FakeTokenizer:
    """Maps each prompt to a one-token id from a fixed vocabulary."""

    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[self.vocab[t]] for t in texts])


class _FakeModel(torch.nn.Module):
    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        feats = self.table[tokens[:, 0]]
        return torch.nn.functional.normalize(feats, dim=-1) if normalize else feats


def test_zero_shot_classifier_template_average() -> None:
    prompts = ["a cat", "the cat", "a dog", "the dog", "a fox", "the fox"]
    vocab = {p: i for i, p in enumerate(prompts)}
    # Unnormalised embeddings: per-prompt normalisation matters before averaging.
    table = torch.tensor(
        [[2.0, 0.0], [0.0, 1.0], [-3.0, 0.0], [0.0, -1.0], [0.0, 5.0], [0.0, 2.0]]
    )
    model = _FakeModel(table)
    # Mixed template kinds: a format string and a callable.
    templates = ["a {}", lambda c: f"the {c}"]
    tokenizer = _FakeTokenizer(vocab)
    w = zero_shot_classifier(model, tokenizer, ["cat", "dog", "fox"], templates, "cpu", batch_size=2)
    s = 1.0 / math.sqrt(2.0)
    expected = torch.tensor([[s, -s, 0.0], [s, -s, 1.0]])  # (d, C)
    assert w.shape == (2, 3)
    torch.testing.assert_close(w, expected)
    acc = zero_shot_accuracy(torch.tensor([[1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]]), torch.tensor([0, 2, 2]), w)
    # img0 -> cat (yes); img1 -> fox (yes); img2 -> logits [-.71, .71, 0] -> dog (no); top5 capped at 3
    assert acc == {"top1": pytest.approx(200.0 / 3.0), "top5": pytest.approx(100.0)}


# ---------------------------------------------------------------------------------------------- detection


def _detection_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    is_noisy = torch.rand(n, generator=gen) < 0.3
    # Noisy pairs score lower on average; overlap keeps AUROC away from 1.
    scores = torch.randn(n, generator=gen) * 2.0 - 1.5 * is_noisy.float()
    flagged = torch.rand(n, generator=gen) < 0.4
    return scores, is_noisy, flagged


def test_detection_matches_sklearn_and_hand_counts() -> None:
    scores, is_noisy, flagged = _detection_data(200, seed=1)
    m = detection_metrics(scores, is_noisy, flagged)
    y = is_noisy.numpy().astype(int)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, -scores.numpy()), abs=1e-6)
    assert m["auprc"] == pytest.approx(average_precision_score(y, -scores.numpy()), abs=1e-6)
    assert 0.5 < m["auroc"] < 1.0
    tp = int((flagged & is_noisy).sum())
    fp = int((flagged & ~is_noisy).sum())
    fn = int((~flagged & is_noisy).sum())
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert m["precision"] == pytest.approx(precision, abs=1e-6)
    assert m["recall"] == pytest.approx(recall, abs=1e-6)
    assert m["f1"] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-6)


def test_detection_small_hand_case() -> None:
    # Lower score = noisier. Noisy pairs: indices 0 and 2.
    scores = torch.tensor([0.1, 0.9, 0.3, 0.2])
    is_noisy = torch.tensor([True, False, True, False])
    flagged = torch.tensor([True, False, False, True])
    m = detection_metrics(scores, is_noisy, flagged)
    # Noisiness order: 0 (noisy), 3 (clean), 2 (noisy), 1 (clean).
    # Pairs (noisy, clean) correctly ordered: (0,3), (0,1), (2,1) of 4 -> 0.75.
    assert m["auroc"] == pytest.approx(0.75)
    # AP: precision at noisy hits = 1/1 and 2/3 -> mean 5/6.
    assert m["auprc"] == pytest.approx(5.0 / 6.0)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5)


def test_detection_without_flags_and_single_class() -> None:
    scores = torch.tensor([0.1, 0.5, 0.9])
    m = detection_metrics(scores, torch.tensor([False, False, False]))
    assert set(m) == {"auroc", "auprc", "f1_best"}
    assert math.isnan(m["auroc"]) and math.isnan(m["auprc"]) and math.isnan(m["f1_best"])
    m = detection_metrics(scores, torch.tensor([True, True, True]), torch.tensor([True, False, True]))
    assert math.isnan(m["auroc"])
    assert m["auprc"] == pytest.approx(1.0) and m["f1_best"] == pytest.approx(1.0)
    assert m["precision"] == pytest.approx(1.0) and m["recall"] == pytest.approx(2.0 / 3.0)


def test_detection_large_scores_keep_order() -> None:
    # Scores of moderate magnitude (here where a float32 sigmoid saturates) must not collapse to ties.
    scores = torch.tensor([-30.0, -25.0, -20.0, -22.0])
    is_noisy = torch.tensor([True, False, False, False])
    assert detection_metrics(scores, is_noisy)["auroc"] == pytest.approx(1.0)


def test_best_f1_is_the_best_cut_found_by_trying_every_threshold() -> None:
    rng = np.random.default_rng(5)
    is_noisy = torch.from_numpy(rng.random(300) < 0.35)
    scores = torch.from_numpy(np.where(is_noisy.numpy(), rng.normal(-1, 1, 300), rng.normal(1, 1, 300)))
    best = 0.0
    for cut in scores.tolist():  # flag every pair at or below the cut
        flags = scores <= cut
        tp = int((flags & is_noisy).sum())
        best = max(best, 2 * tp / (int(flags.sum()) + int(is_noisy.sum())))
    got = detection_metrics(scores, is_noisy)["f1_best"]
    assert got == pytest.approx(best, abs=1e-6)
    assert 0.6 < got < 1.0  # overlapping classes: no cut is perfect, the best one is far above chance


def test_meter_over_two_updates_equals_one_shot() -> None:
    scores, is_noisy, flagged = _detection_data(150, seed=2)
    meter = NCDetectionMeter()
    meter.update(scores[:60], is_noisy[:60], flagged[:60])
    meter.update(scores[60:], is_noisy[60:], flagged[60:])
    got = meter.compute()
    expected = detection_metrics(scores, is_noisy, flagged)
    assert set(got) == {"auroc", "auprc", "f1_best", "precision", "recall", "f1"}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key

    meter.reset()
    meter.update(scores[:5], torch.zeros(5, dtype=torch.bool), flagged[:5])
    assert math.isnan(meter.compute()["auroc"])

    ranking_only = NCDetectionMeter(with_flags=False)
    ranking_only.update(scores, is_noisy)
    got = ranking_only.compute()
    assert set(got) == {"auroc", "auprc", "f1_best"}
    assert got["auroc"] == pytest.approx(expected["auroc"], abs=1e-6)


def test_flag_metrics_without_noisy_or_flagged_pairs_are_undefined_not_zero():
    scores = torch.tensor([0.9, 0.8, 0.1, 0.7])
    clean = torch.zeros(4, dtype=torch.bool)
    flagged = torch.tensor([False, False, True, False])
    out = detection_metrics(scores, clean, flagged)  # noise rate 0: recall and F1 have no denominator
    assert math.isnan(out["recall"]) and math.isnan(out["f1"]) and out["precision"] == 0.0
    meter = NCDetectionMeter()
    meter.update(scores, clean, flagged)
    got = meter.compute()
    assert math.isnan(got["recall"]) and math.isnan(got["f1"]) and got["precision"] == 0.0
    noisy = torch.tensor([False, False, True, False])
    nothing = torch.zeros(4, dtype=torch.bool)  # a quota of k = 0: precision has no denominator
    out = detection_metrics(scores, noisy, nothing)
    assert math.isnan(out["precision"]) and out["recall"] == 0.0 and out["f1"] == 0.0
    meter.reset()
    meter.update(scores, noisy, nothing)
    assert math.isnan(meter.compute()["precision"])
    out = detection_metrics(scores, noisy, noisy)
    assert out["precision"] == out["recall"] == out["f1"] == 1.0
