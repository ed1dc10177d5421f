"""evaluate.py: a smoke run evaluated on the embedded suite, a pre-trained model, the paper-style tasks on toy
data, every benchmark config, and the errors for unset or missing paths."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from conftest import CONF, ROOT, assert_figure, compose_cfg
from ncu.config import ConfigError
from ncu.eval.suite import evaluate, suite_tasks
from ncu.eval.tasks import TASKS, align_labels, batch_nc_scores, classification_set
from ncu.run import HEADLINE, train

# The smoke experiment, shortened to 2 steps per stage (the evaluation is under test, not the training).
SMOKE = ["experiment=smoke", "method=clip", "logger=none", "print_table=false", "epochs_cap=1",
         "trainer.limit_train_batches=2"]
# The smoke experiment's data, for a pre-trained model evaluated on the same pairs.
SMOKE_DATA = ["+run_overrides.data.limit=384", "+run_overrides.data.max_side=48",
              "+run_overrides.data.n_concepts=40", "+run_overrides.data.n_train=384",
              "+run_overrides.data.n_val=64", "+run_overrides.data.n_test=128", "+run_overrides.data.image_size=32",
              "+run_overrides.data.batch_size=64"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    metrics, objects = train(compose_cfg(SMOKE, tmp_path=tmp))
    return metrics, objects["run_dir"]


@pytest.fixture(scope="module")
def embedded_eval(smoke_run, tmp_path_factory):
    _, run_dir = smoke_run
    tmp = tmp_path_factory.mktemp("eval")
    cfg = compose_cfg([f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "benchmark=embedded",
                       "print_table=false"], config_name="evaluate", tmp_path=tmp)
    metrics, objects = evaluate(cfg)
    return metrics, objects


# --- the embedded suite on a training run ------------------------------------------------------------------


def test_embedded_suite_reproduces_the_run_and_writes_every_figure(smoke_run, embedded_eval):
    run_metrics, _ = smoke_run
    metrics, objects = embedded_eval
    out_dir = objects["out_dir"]
    assert json.loads((out_dir / "metrics.json").read_text()) == pytest.approx(metrics, nan_ok=True)
    for key in HEADLINE:  # the run's own test split: the numbers train.py wrote, under both prefixes
        assert metrics[f"test/{key}"] == pytest.approx(run_metrics[f"test/{key}"], abs=1e-6), key
        assert metrics[f"eval/embedded/{key}"] == metrics[f"test/{key}"]
    n_digits = 450  # the 25 % test part of the 1,797 digits: accuracies are multiples of 1/450
    for key in ("zeroshot_top1", "zeroshot_top5", "linear_probe_acc"):
        count = metrics[f"eval/digits/{key}"] * n_digits / 100
        assert count == pytest.approx(round(count), abs=1e-6), key
    assert metrics["eval/digits/zeroshot_top5"] >= metrics["eval/digits/zeroshot_top1"]
    # Frozen features of even a barely trained micro model separate real digits far above chance (10%).
    assert metrics["eval/digits/linear_probe_acc"] > 40.0
    dm = objects["datamodule"]
    count = metrics["eval/emoji/linear_probe_acc"] * len(dm.datasets["test"]) / 100  # one prediction per test image
    assert count == pytest.approx(round(count), abs=1e-6)
    categories = set(dm.datasets["train"].frame["category"]) | set(dm.datasets["test"].frame["category"])
    assert metrics["eval/emoji/num_classes"] == len(categories)
    precision, recall = metrics["eval/detection/precision"], metrics["eval/detection/recall"]
    assert metrics["eval/detection/f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert_figure(out_dir / "detection_scores.png")
    meta = json.loads((out_dir / "meta.json").read_text())
    assert meta["benchmark"] == "embedded" and meta["model"] == "ncu-micro"


def test_detection_figures_against_the_noise_artifact(smoke_run, embedded_eval):
    run_metrics, run_dir = smoke_run
    metrics, objects = embedded_eval
    saved = np.load(objects["out_dir"] / "detection_scores.npz")
    scores, noisy, flagged = saved["scores"], saved["noisy"], saved["flagged"]
    # The ground truth is the artifact the run trained on (read back from its folder).
    artifact = json.loads((run_dir / "noise_meta.json").read_text())["artifact_dir"]
    mask = np.load(Path(artifact) / "noisy_mask.npy")
    np.testing.assert_array_equal(noisy, mask)
    assert metrics["eval/detection/noise_rate"] == pytest.approx(run_metrics["noise/realised_rate"])
    # Lower score = noisier: rank metrics of -score (scikit-learn, not torchmetrics).
    assert metrics["eval/detection/auroc"] == pytest.approx(roc_auc_score(noisy, -scores), abs=1e-6)
    assert metrics["eval/detection/auprc"] == pytest.approx(average_precision_score(noisy, -scores), abs=1e-6)
    # 384 pairs in batches of 64 at nc_ratio 0.4: floor(25.6) = 25 flags per batch.
    assert flagged.sum() == 6 * 25
    tp = (flagged & noisy).sum()
    assert metrics["eval/detection/precision"] == pytest.approx(tp / flagged.sum())
    assert metrics["eval/detection/recall"] == pytest.approx(tp / noisy.sum())
    assert (scores > 0).all() and (scores <= 1).all()  # softmax probabilities


def test_category_probe_uses_each_training_row_own_image(embedded_eval):
    from ncu.data.images import load_image
    from ncu.eval.tasks import _own_images

    _, objects = embedded_eval
    ds = objects["datamodule"].datasets["train"]
    images, cats = _own_images(objects["context"], "train")
    assert cats == list(ds.frame["category"])
    noisy_rows = np.flatnonzero(ds.noisy)[:5]
    for k in [0, 1, *noisy_rows]:
        own = load_image(ds.frame.at[k, "image"], 48)  # the smoke run's max_side
        assert np.array_equal(np.asarray(images[k]), np.asarray(own)), k
    # What the noisy pairs show are other images.
    assert any(not np.array_equal(np.asarray(ds.images[ds.image_index[k]]), np.asarray(images[k]))
               for k in noisy_rows)


def test_batch_scores_against_a_dense_softmax():
    torch.manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(10, 6), dim=1)
    t = torch.nn.functional.normalize(torch.randn(10, 6), dim=1)
    scale = 7.0
    dense = torch.exp(scale * v @ t.T)
    full = (dense.diagonal() / dense.sum(dim=1)).float()
    # One batch holding every pair: the softmax over all captions.
    scores, flagged = batch_nc_scores(v, t, scale, batch_size=16, ratio=0.3, seed=0)
    torch.testing.assert_close(scores, full)
    assert set(torch.nonzero(flagged).flatten().tolist()) == set(full.argsort()[:3].tolist())
    # Batches of at most 4 (sizes 4, 3, 3): each pair competes with fewer captions, so its probability grows,
    # and each batch flags floor(0.5 * size) = 2, 1, 1 pairs.
    scores, flagged = batch_nc_scores(v, t, scale, batch_size=4, ratio=0.5, seed=3)
    assert (scores >= full - 1e-6).all() and (scores > full + 1e-6).any()
    assert int(flagged.sum()) == 4
    # Recover each pair's batch from its score: the batch is the set of pairs whose dense probabilities,
    # renormalised over it, give back the scores.
    order = np.random.default_rng(3).permutation(10)
    for chunk in np.array_split(order, 3):
        sub = dense[chunk][:, chunk]
        torch.testing.assert_close(scores[chunk], (sub.diagonal() / sub.sum(dim=1)).float())


# --- a pre-trained model through the same code ------------------------------------------------------------


def test_pretrained_model_reproduces_the_run_before_fine_tuning(smoke_run, tmp_path):
    run_metrics, run_dir = smoke_run
    ckpt = run_dir / "checkpoints" / "stage0_pretrain.ckpt"
    cfg = compose_cfg(["ckpt_path=pretrained", "model=micro", f"model.pretrained={ckpt}", *SMOKE_DATA,
                       "benchmark.tasks.digits=null", "benchmark.tasks.emoji=null", "print_table=false"],
                      config_name="evaluate", tmp_path=tmp_path)
    metrics, objects = evaluate(cfg)
    # Data from run_defaults (the training defaults) with the smoke sizes: the run's "before" numbers.
    for key in HEADLINE:
        assert metrics[f"eval/embedded/{key}"] == pytest.approx(run_metrics[f"pretrain/{key}"], abs=1e-6), key
    assert metrics["eval/detection/noise_rate"] == pytest.approx(run_metrics["noise/realised_rate"])
    assert not any(k.startswith("eval/digits") for k in metrics)
    assert (objects["out_dir"] / "metrics.json").exists()


def test_laclip_checkpoint_file_is_loaded_with_laclip_preprocessing(tmp_path):
    """model.name=LaCLIP-*: the LaCLIP-format file is imported, also into the run objects of data tasks."""
    import open_clip

    from ncu.models import laclip

    laclip.register_qknorm_vit("laclip_evaltest_vit", "vit_tiny_patch16_224", img_size=32, patch_size=8,
                               embed_dim=48, depth=1, num_heads=3)
    config = laclip.laclip_config("laclip_evaltest_vit", embed_dim=24, image_size=32, context_length=16,
                                  text_width=32, text_heads=2, text_layers=1)
    (tmp_path / "LaCLIP-evaltest-tiny.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "LaCLIP-evaltest-tiny.json")
    torch.manual_seed(1)
    source = open_clip.create_model("LaCLIP-evaltest-tiny").state_dict()
    # The same tensors under LaCLIP's names (timm trunk at visual.*, image_projection used as x @ P).
    released = {}
    for key, value in source.items():
        if key == "visual.head.proj.weight":
            released["image_projection"] = value.T.clone()
        else:
            released[key.replace("visual.trunk.", "visual.", 1)] = value.clone()
    torch.save({"state_dict": {f"module.{k}": v for k, v in released.items()}}, tmp_path / "laclip.pt")
    cfg = compose_cfg(["ckpt_path=pretrained", "model.name=LaCLIP-evaltest-tiny",
                       f"model.pretrained={tmp_path / 'laclip.pt'}", *SMOKE_DATA, "print_table=false",
                       "benchmark.tasks.embedded=null", "benchmark.tasks.digits=null",
                       "benchmark.tasks.detection=null"],
                      config_name="evaluate", tmp_path=tmp_path)
    metrics, objects = evaluate(cfg)
    assert 0.0 <= metrics["eval/emoji/linear_probe_acc"] <= 100.0
    state = objects["module"].model.state_dict()
    assert state.keys() == source.keys()
    assert all(torch.equal(state[k], source[k]) for k in source)
    # LaCLIP's ImageNet normalisation, in the evaluation and in the data module's splits alike.
    for transform in (objects["context"].preprocess, objects["datamodule"].datasets["test"].transform):
        normalize = transform.transforms[-1]
        assert tuple(normalize.mean) == pytest.approx((0.485, 0.456, 0.406))


def write_image(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), color).save(path)


COLORS = {"red": [(250, 0, 0), (230, 20, 10), (240, 5, 30)],
          "blue": [(0, 0, 250), (20, 10, 230), (5, 30, 240)],
          "green": [(0, 250, 0), (20, 230, 10), (30, 240, 5)]}


@pytest.fixture
def toy(tmp_path):
    for split in ("train", "test"):
        for name, colors in COLORS.items():
            for i, color in enumerate(colors if split == "train" else colors[:2]):
                write_image(tmp_path / split / name / f"{i}.png", color)
    # Listed in another order than the sorted folders: matched by name.
    (tmp_path / "classes.yaml").write_text("classes: [red, blue, green, yellow]\n"
                                           "templates: ['a {} square.', '{}']\n")
    rows = ["filepath,caption"] + [f"{split}/{name}/0.png,a {name} square {k}" for split in ("train", "test")
                                   for name in COLORS for k in range(2)]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_paper_style_tasks_on_toy_data(toy, tmp_path):
    cfg = compose_cfg(["ckpt_path=pretrained", "model=micro", "benchmark=zeroshot_folder",
                       f"benchmark.tasks.zeroshot.data={toy / 'test'}", "print_table=false"],
                      config_name="evaluate", tmp_path=tmp_path)
    with open_dict(cfg):
        tasks = cfg.benchmark.tasks
        tasks.named = {**tasks.zeroshot, "classnames": str(toy / "classes.yaml")}
        tasks.probe = {"kind": "linear_probe_folder", "train": str(toy / "train"), "test": str(toy / "test"),
                       "C": 1.0}
        tasks.coco = {"kind": "retrieval_csv", "csv": str(toy / "pairs.csv"), "coco_fold_size": 3}
        tasks.flickr = {"kind": "retrieval_csv", "csv": str(toy / "pairs.csv")}
    metrics, objects = evaluate(cfg)
    # 6 test images: accuracies are multiples of 1/6.
    for key in ("eval/zeroshot/zeroshot_top1", "eval/named/zeroshot_top1"):
        assert round(metrics[key] * 6 / 100, 6) == round(metrics[key] * 6 / 100)
    mean = (metrics["eval/zeroshot/zeroshot_top1"] + metrics["eval/named/zeroshot_top1"]) / 2
    assert metrics["eval/mean/zeroshot_top1"] == pytest.approx(mean)
    # Solid colours: three well-separated clusters for a linear probe.
    assert metrics["eval/probe/linear_probe_acc"] == 100.0
    # 6 images x 2 captions: 2 folds of 3 images (1k/*) and the whole set (5k/*).
    assert {"eval/coco/1k/rsum", "eval/coco/5k/rsum", "eval/flickr/rsum"} <= set(metrics)
    assert metrics["eval/coco/5k/rsum"] == pytest.approx(metrics["eval/flickr/rsum"])
    assert objects["datamodule"] is None  # no task needed a run's data


def test_class_names_match_folders_by_name_or_by_position(toy, tmp_path):
    ds = classification_set(str(toy / "test"), {})
    assert ds.classnames == ["blue", "green", "red"]
    align_labels(ds, ["red", "blue", "green", "yellow"], "toy")
    assert {(Path(p).parent.name, y) for p, y in ds.samples} == {("red", 0), ("blue", 1), ("green", 2)}
    ds = classification_set(str(toy / "test"), {})
    align_labels(ds, ["c0", "c1", "c2"], "toy")  # not names of the folders: sorted folder i is class i
    assert {(Path(p).parent.name, y) for p, y in ds.samples} == {("blue", 0), ("green", 1), ("red", 2)}
    with pytest.raises(ConfigError, match="3 classes in the data but 2 class names"):
        align_labels(classification_set(str(toy / "test"), {}), ["c0", "c1"], "toy")


def test_numbered_class_folders_are_class_indices(tmp_path):
    for name in ("0", "1", "2", "10"):  # sorted as text: 0, 1, 10, 2
        write_image(tmp_path / name / "a.png", (1, 2, 3))
    ds = classification_set(str(tmp_path), {})
    assert {Path(p).parent.name: label for p, label in ds.samples} == {"0": 0, "1": 1, "2": 2, "10": 10}
    assert len(ds.classnames) == 11


# --- configs and errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "benchmark").glob("*.yaml")))
def test_every_benchmark_composes(name):
    cfg = compose_cfg(["ckpt_path=pretrained", f"benchmark={name}"], config_name="evaluate")
    assert cfg.benchmark.name == name and cfg.benchmark.tasks
    assert all(task.kind in TASKS for task in cfg.benchmark.tasks.values())
    if name == "embedded":
        assert set(suite_tasks(cfg.benchmark)) == {"embedded", "digits", "emoji", "detection"}
    else:  # the data paths are left for the user to fill in
        with pytest.raises(ConfigError, match=r"benchmark\.tasks\.\w+\.\w+=<path>"):
            suite_tasks(cfg.benchmark)


def test_paper_suite_lists_every_unset_path():
    cfg = compose_cfg(["ckpt_path=pretrained", "benchmark=paper"], config_name="evaluate")
    with pytest.raises(ConfigError) as err:
        suite_tasks(cfg.benchmark)
    for key in ("imagenet.data", "flickr30k.csv", "mscoco.csv"):
        assert f"benchmark.tasks.{key}=<path>" in str(err.value)
    assert cfg.benchmark.tasks.mscoco.coco_fold_size == 1000


def test_unset_or_missing_path_is_one_clear_error(tmp_path):
    cfg = compose_cfg(["ckpt_path=pretrained", "model=micro", "benchmark=retrieval_csv"],
                      config_name="evaluate", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=r"pass benchmark\.tasks\.retrieval\.csv=<path>$"):
        evaluate(cfg)
    cfg = compose_cfg(["ckpt_path=pretrained", "model=micro", "benchmark=retrieval_csv",
                       f"benchmark.tasks.retrieval.csv={tmp_path / 'absent.csv'}"], config_name="evaluate",
                      tmp_path=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"benchmark\.tasks\.retrieval\.csv=.*absent\.csv"):
        evaluate(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_wrong_column_or_class_file_is_one_error_before_the_model_loads(tmp_path, monkeypatch):
    from ncu.eval import suite

    monkeypatch.setattr(suite, "create_bundle", lambda *a: pytest.fail("model loaded before the check"))
    table = tmp_path / "pairs.csv"
    table.write_text("image,text\na.png,a cat\n")
    cfg = compose_cfg(["ckpt_path=pretrained", "model=micro", "benchmark=retrieval_csv",
                       f"benchmark.tasks.retrieval.csv={table}"], config_name="evaluate", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=r"^benchmark\.tasks\.retrieval\.csv: .*pairs\.csv: column 'filepath' "
                                          r"\(image_key\) not found; columns found: \['image', 'text'\]"):
        evaluate(cfg)
    # the same file read with the task's own separator: one column, so the hint names the task's sep key
    cfg.benchmark.tasks.retrieval.sep = ";"
    with pytest.raises(ConfigError, match=r"wrong separator\? set benchmark\.tasks\.retrieval\.sep"):
        evaluate(cfg)

    labels = tmp_path / "labels.csv"
    labels.write_text("image,class\na.png,cat\n")
    cfg = compose_cfg(["ckpt_path=pretrained", "model=micro", "benchmark=zeroshot_folder",
                       f"benchmark.tasks.zeroshot.data={labels}"], config_name="evaluate", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=r"^benchmark\.tasks\.zeroshot\.data: .*column 'label' \(label_key\)"):
        evaluate(cfg)
    names = tmp_path / "classes.yaml"
    names.write_text("classes: [cat]\n")
    cfg.benchmark.tasks.zeroshot.label_key = "class"
    cfg.benchmark.tasks.zeroshot.classnames = str(names)
    with pytest.raises(ConfigError, match=r"^benchmark\.tasks\.zeroshot: .*classes\.yaml: missing key.*tem"):
        evaluate(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_cli_prints_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "evaluate.py", "ckpt_path=pretrained", "model=micro",
                           "benchmark=retrieval_csv", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: benchmark 'retrieval_csv' needs paths that are not set (???): pass "
                     "benchmark.tasks.retrieval.csv=<path>"]
    assert "Traceback" not in proc.stderr


def test_tasks_of_train_eval_are_scored_during_training_as_val_metrics(toy, tmp_path):
    """train_eval.tasks: a zero-shot image folder scored at the end of every epoch of every stage (val/<task>/*
    in the CSV log, once per epoch), with the numbers evaluate.py gives the same model on the same task; a
    task without a path is left out with one line, and a missing folder is refused before anything trains."""
    import pandas as pd

    from ncu.run import train

    task = {"kind": "zeroshot_folder", "data": str(toy / "test"), "topk": [1]}
    cfg = compose_cfg(["experiment=smoke", "method=clip", "logger=csv", "print_table=false", "data.shifts=[]",
                       "pretrain.enabled=false", "method.stages.finetune.epochs=2"], tmp_path=tmp_path)
    with open_dict(cfg):
        cfg.train_eval.tasks = {"toy": task, "unset": {**task, "data": None}}
    metrics, objects = train(cfg)
    log = pd.read_csv(objects["run_dir"] / "csv" / "metrics.csv")
    scored = log.dropna(subset=["val/toy/zeroshot_top1"])
    assert len(scored) == 2 and not any(c.startswith("val/unset/") for c in log.columns)
    assert all(round(v * 6 / 100, 6) == round(v * 6 / 100) for v in scored["val/toy/zeroshot_top1"])
    ecfg = compose_cfg([f"ckpt_path={objects['run_dir'] / 'checkpoints' / 'stage0_finetune.ckpt'}",
                        "benchmark=zeroshot_folder", f"benchmark.tasks.zeroshot.data={toy / 'test'}",
                        "benchmark.tasks.zeroshot.topk=[1]", "print_table=false"], config_name="evaluate",
                       tmp_path=tmp_path / "eval")
    emetrics, _ = evaluate(ecfg)
    assert scored["val/toy/zeroshot_top1"].iloc[-1] == pytest.approx(emetrics["eval/zeroshot/zeroshot_top1"])
    with open_dict(cfg):
        cfg.train_eval.tasks = {"toy": {**task, "data": str(toy / "nowhere")}}
    with pytest.raises(FileNotFoundError, match="train_eval.tasks.toy.data"):
        train(cfg)
