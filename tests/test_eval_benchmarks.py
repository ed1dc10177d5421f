"""Evaluation datasets, encoders, zero-shot/retrieval wiring, the COCO 1K/5K protocol and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ncu.eval import benchmarks as B
from ncu.eval.plots import heatmap, score_histogram
from ncu.eval.retrieval import retrieval_metrics
from ncu.models.factory import create


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return create("ncu-micro")


def write_image(path, color, size=(20, 14)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def toy_folder(tmp_path):
    root = tmp_path / "toy"
    colors = {"dog": [(200, 10, 10), (180, 30, 0)], "ant": [(0, 0, 250)], "cat": [(0, 200, 0), (10, 220, 5)]}
    for name, cols in colors.items():
        for i, c in enumerate(cols):
            write_image(root / name / f"{i}.png", c)
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


# --- class names and templates -------------------------------------------------------------------------


def test_classnames_templates_yaml_and_json(tmp_path):
    (tmp_path / "c.yaml").write_text("classes: [cat, dog]\ntemplates:\n  - 'a photo of a {}.'\n  - '{} art'\n")
    assert B.load_classnames_templates(tmp_path / "c.yaml") == (["cat", "dog"], ["a photo of a {}.", "{} art"])
    (tmp_path / "c.json").write_text(json.dumps({"classes": ["x"], "templates": ["itap of a {}."]}))
    assert B.load_classnames_templates(tmp_path / "c.json") == (["x"], ["itap of a {}."])


def test_classnames_templates_imagenet_special_value(tmp_path):
    (tmp_path / "in.yaml").write_text("classes: imagenet\ntemplates: imagenet\n")
    classes, templates = B.load_classnames_templates(tmp_path / "in.yaml")
    assert len(classes) == 1000 and classes[0] == "tench" and classes[1] == "goldfish"
    assert len(templates) == 80 and templates[0] == "a bad photo of a {}."
    assert all(isinstance(t, str) and t.count("{}") == 1 for t in templates)
    (tmp_path / "mixed.yaml").write_text("classes: [a, b]\ntemplates: imagenet\n")
    assert B.load_classnames_templates(tmp_path / "mixed.yaml")[0] == ["a", "b"]


def test_classnames_templates_errors(tmp_path):
    (tmp_path / "no_t.yaml").write_text("classes: [a]\n")
    with pytest.raises(KeyError, match="templates"):
        B.load_classnames_templates(tmp_path / "no_t.yaml")
    with pytest.raises(FileNotFoundError):
        B.load_classnames_templates(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("classes: [a]\ntemplates: ['a photo']\n")
    with pytest.raises(ValueError, match="placeholder"):
        B.load_classnames_templates(tmp_path / "bad.yaml")
    # Python is never evaluated: a classes.py-style dict literal is not valid YAML data here.
    (tmp_path / "code.yaml").write_text("__import__('os').system('true')\n")
    with pytest.raises(ValueError):
        B.load_classnames_templates(tmp_path / "code.yaml")


# --- classification datasets ---------------------------------------------------------------------------


def test_image_folder(toy_folder):
    ds = B.ImageFolderClassification(toy_folder)
    assert ds.classnames == ["ant", "cat", "dog"]
    names = [(p.split("/")[-2], p.split("/")[-1], y) for p, y in ds.samples]
    assert names == [("ant", "0.png", 0), ("cat", "0.png", 1), ("cat", "1.png", 1),
                     ("dog", "0.png", 2), ("dog", "1.png", 2)]
    assert ds.labels.tolist() == [0, 1, 1, 2, 2]


def test_csv_classification(tmp_path):
    write_image(tmp_path / "img" / "a.png", (1, 2, 3))
    (tmp_path / "names.csv").write_text("path,label\nimg/a.png,dog\nimg/a.png,cat\n/abs/b.png,dog\n")
    ds = B.CsvClassification(tmp_path / "names.csv", "path", "label")
    assert ds.classnames == ["cat", "dog"]
    assert ds.samples == [(str(tmp_path / "img" / "a.png"), 1), (str(tmp_path / "img" / "a.png"), 0),
                          ("/abs/b.png", 1)]
    (tmp_path / "ints.csv").write_text("path,label\nx.png,2\ny.png,0\n")
    ds = B.CsvClassification(tmp_path / "ints.csv", "path", "label", classnames=["a", "b", "c"])
    assert [y for _, y in ds.samples] == [2, 0] and ds.classnames == ["a", "b", "c"]
    assert B.CsvClassification(tmp_path / "ints.csv", "path", "label").classnames == ["0", "1", "2"]
    with pytest.raises(ValueError, match="'7'"):
        (tmp_path / "bad.csv").write_text("path,label\nx.png,7\n")
        B.CsvClassification(tmp_path / "bad.csv", "path", "label", classnames=["a", "b"])
    with pytest.raises(KeyError, match="label"):
        B.CsvClassification(tmp_path / "ints.csv", "path", "target")


def test_digits_dataset():
    from sklearn.datasets import load_digits

    full = B.digits_dataset()
    raw = load_digits()
    assert len(full) == 1797 and full.classnames[0] == "zero" and full.classnames[9] == "nine"
    assert full.labels.tolist() == raw.target.tolist()
    image = np.asarray(full.images[5])
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    # Nearest upscaling by 4 = each 8x8 pixel repeated in a 4x4 block; 0..16 -> 0..255.
    expected = np.kron(np.rint(raw.images[5] * 255 / 16), np.ones((4, 4)))
    assert np.array_equal(image[..., 0], expected) and np.array_equal(image[..., 2], expected)

    train, test = B.digits_dataset("train"), B.digits_dataset("test")
    assert len(train) + len(test) == 1797
    assert abs(len(test) - 0.25 * 1797) < 10
    assert np.bincount(test.labels.numpy(), minlength=10).min() >= 40  # every class in the test split
    again = B.digits_dataset("test")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(test.images[:20], again.images[:20]))
    with pytest.raises(ValueError):
        B.digits_dataset("val")


# --- encoders and zero-shot ----------------------------------------------------------------------------


def test_evaluate_zeroshot_matches_manual_computation(micro, toy_folder):
    ds = B.ImageFolderClassification(toy_folder)
    templates = ["a photo of a {}.", "a drawing of a {}."]
    micro.model.train()
    out = B.evaluate_zeroshot(micro.model, micro.preprocess_val, micro.tokenizer, ds, templates, "cpu")
    assert micro.model.training  # mode restored
    assert set(out) == {"top1", "top5"}

    # Independent path: prompts per class, then nearest class embedding, written out by hand.
    model = micro.model.eval()
    with torch.no_grad():
        class_emb = []
        for name in ds.classnames:
            t = model.encode_text(micro.tokenizer([tp.format(name) for tp in templates]), normalize=True)
            class_emb.append(torch.nn.functional.normalize(t.mean(0), dim=0))
        pixels = torch.stack([micro.preprocess_val(Image.open(p).convert("RGB")) for p, _ in ds.samples])
        img = model.encode_image(pixels, normalize=True)
    predicted = (img @ torch.stack(class_emb).T).argmax(1)
    assert out["top1"] == pytest.approx((predicted == ds.labels).double().mean().item() * 100)


def test_encoders_accept_paths_and_images(micro, toy_folder):
    paths = sorted(str(p) for p in toy_folder.rglob("*.png"))
    pil = [Image.open(p).convert("RGB") for p in paths]
    a = B.encode_images(micro.model, micro.preprocess_val, paths, "cpu", batch_size=2)
    b = B.encode_images(micro.model, micro.preprocess_val, pil, "cpu", batch_size=64)
    assert a.shape == (5, 32) and torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a.norm(dim=1), torch.ones(5), atol=1e-5)
    t = B.encode_texts(micro.model, micro.tokenizer, ["a", "b c", "d"], "cpu", batch_size=2, normalize=False)
    assert t.shape == (3, 32)


# --- retrieval -----------------------------------------------------------------------------------------


def test_read_retrieval_csv_groups_by_image(tmp_path):
    (tmp_path / "r.csv").write_text(
        "filepath,caption\nb.png,b one\na.png,a one\nb.png,b two\n/x/c.png,c one\na.png,a two\n"
    )
    data = B.read_retrieval_csv(tmp_path / "r.csv", "filepath", "caption")
    assert data.images == [str(tmp_path / "b.png"), str(tmp_path / "a.png"), "/x/c.png"]
    assert data.captions == ["b one", "a one", "b two", "c one", "a two"]
    assert data.text_to_image.tolist() == [0, 1, 0, 2, 1]


def test_coco_1k_5k_folds():
    gen = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(10, 6, generator=gen), dim=1)
    owner = torch.arange(10).repeat(2)[torch.randperm(20, generator=gen)]  # 2 captions each, shuffled
    texts = torch.nn.functional.normalize(images[owner] + 0.8 * torch.randn(20, 6, generator=gen), dim=1)
    out = B.coco_1k_5k(images, texts, owner, fold_size=5, chunk_size=3)

    folds = []
    for f in range(2):
        rows = [j for j in range(20) if 5 * f <= int(owner[j]) < 5 * f + 5]
        folds.append(retrieval_metrics(images[5 * f: 5 * f + 5], texts[rows], owner[rows] - 5 * f))
    full = retrieval_metrics(images, texts, owner)
    for key in full:
        assert out[f"1k/{key}"] == pytest.approx((folds[0][key] + folds[1][key]) / 2)
        assert out[f"5k/{key}"] == pytest.approx(full[key])
    assert out["1k/rsum"] != out["5k/rsum"]  # fewer distractors per fold
    with pytest.raises(ValueError):
        B.coco_1k_5k(images, texts, owner, fold_size=4)


def test_evaluate_retrieval_csv_runs(micro, tmp_path):
    colors = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]
    lines = ["image,caption"]
    for i, c in enumerate(colors):
        write_image(tmp_path / f"{i}.png", c)
        lines += [f"{i}.png,colour {i} first", f"{i}.png,colour {i} second"]
    (tmp_path / "ret.csv").write_text("\n".join(lines) + "\n")
    args = (micro.model, micro.preprocess_val, micro.tokenizer, tmp_path / "ret.csv", "image", "caption", "cpu")
    out = B.evaluate_retrieval_csv(*args, chunk_size=3)
    # R@1 recomputed by hand from the model's own features: 4 images, 8 captions (2 per image).
    from PIL import Image

    with torch.no_grad():
        v = micro.model.encode_image(torch.stack([micro.preprocess_val(Image.open(tmp_path / f"{i}.png").convert("RGB"))
                                                  for i in range(4)]), normalize=True)
        captions = [f"colour {i} {w}" for i in range(4) for w in ("first", "second")]
        t = micro.model.encode_text(micro.tokenizer(captions), normalize=True)
    sim, owner = v @ t.T, [k // 2 for k in range(8)]
    i2t = 100 * sum(owner[int(sim[i].argmax())] == i for i in range(4)) / 4
    t2i = 100 * sum(int(sim[:, k].argmax()) == owner[k] for k in range(8)) / 8
    assert out["i2t_R@1"] == pytest.approx(i2t) and out["t2i_R@1"] == pytest.approx(t2i)
    folds = B.evaluate_retrieval_csv(*args, coco_fold_size=2)
    assert folds["5k/rsum"] == pytest.approx(out["rsum"]) and "1k/i2t_R@1" in folds


# --- plots ---------------------------------------------------------------------------------------------


def test_plots_write_png(tmp_path):
    gen = torch.Generator().manual_seed(0)
    scores = torch.cat([torch.randn(90, generator=gen) + 2, torch.randn(10, generator=gen)])
    noisy = torch.arange(100) >= 90
    path = score_histogram(scores, noisy, tmp_path / "sub" / "hist.png", title="NC scores")
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path = heatmap(torch.softmax(torch.randn(8, 9, generator=gen), 1), tmp_path / "ot.png", "OT target")
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        heatmap(torch.zeros(3), tmp_path / "bad.png", "1-D")
    with pytest.raises(ValueError):
        score_histogram(scores, noisy[:5], tmp_path / "bad2.png")
