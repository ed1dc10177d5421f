"""The tasks of an evaluation suite (``ncu/eval/suite.py`` runs them; ``conf/benchmark/`` chooses them): each
takes its config and the ``Context`` (one model in eval mode, its transform and tokenizer, the rebuilt run)
and returns its metrics without the ``eval/<task>/`` prefix."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from ncu.config import ConfigError
from ncu.run import test_metrics

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.",)
# CSV column keys of the tasks and their defaults when a task config leaves them out.
RETRIEVAL_COLUMNS = {"image_key": "filepath", "caption_key": "caption"}
CLASSIFICATION_COLUMNS = {"image_key": "image", "label_key": "label"}


def columns_of(task: dict, defaults: dict[str, str]) -> dict[str, str]:
    return {role: task.get(role, default) for role, default in defaults.items()}


@dataclass
class Context:
    """What every task evaluates: one model in eval mode, its val transform and tokenizer."""

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    device: torch.device
    out_dir: Path
    run_cfg: DictConfig
    trainer_kwargs: dict
    datamodule: Any = None
    module: Any = None

    def ready(self) -> torch.nn.Module:
        """The model on the evaluation device in eval mode (a Lightning test may have moved it)."""
        return self.model.to(self.device).eval()


# ---------------------------------------------------------------------------------------------------------
# Tasks: each returns metrics without the ``eval/<task>/`` prefix.


def task_run_test(name: str, task: dict, ctx: Context) -> dict[str, float]:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(ctx.out_dir), **ctx.trainer_kwargs)
    metrics = test_metrics(trainer, ctx.module, ctx.datamodule, "test")
    return {key.removeprefix("test/"): value for key, value in metrics.items()}


def _features(ctx: Context, images: list, normalize: bool, batch_size: int) -> torch.Tensor:
    from ncu.eval.benchmarks import encode_images

    return encode_images(ctx.ready(), ctx.preprocess, images, ctx.device, batch_size, normalize=normalize)


def _zeroshot(ctx: Context, feats: torch.Tensor, labels: torch.Tensor, classnames: list[str],
              templates: list, topk: list[int]) -> dict[str, float]:
    """Top-k accuracy (percent) of features (not necessarily normalised) against a prompt classifier."""
    from ncu.eval.benchmarks import zeroshot_of_features

    acc = zeroshot_of_features(ctx.ready(), ctx.tokenizer, feats, labels, classnames, templates, ctx.device, topk)
    return {f"zeroshot_{k}": v for k, v in acc.items()}


def _probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
           test_labels: torch.Tensor, task: dict) -> dict[str, float]:
    from ncu.eval.linear_probe import DEFAULT_CS, linear_probe

    out = linear_probe(train_feats, train_labels, test_feats, test_labels, C=task.get("C"),
                       Cs=task.get("Cs") or DEFAULT_CS, val_frac=task.get("val_frac", 0.2),
                       max_iter=task.get("max_iter", 1000), seed=task.get("seed", 0))
    return {"linear_probe_acc": out["acc"], "linear_probe_C": out["C"]}


def task_digits(name: str, task: dict, ctx: Context) -> dict[str, float]:
    from ncu.eval.benchmarks import DIGIT_TEMPLATES, digits_dataset

    bs = task.get("batch_size", 256)
    size, frac, seed = task.get("size", 32), task.get("test_frac", 0.25), task.get("seed", 0)
    train = digits_dataset("train", size, frac, seed)
    test = digits_dataset("test", size, frac, seed)
    test_feats = _features(ctx, test.images, False, bs)
    out = {}
    if task.get("zeroshot", True):
        out |= _zeroshot(ctx, test_feats, test.labels, test.classnames, list(DIGIT_TEMPLATES),
                         task.get("topk", [1, 5]))
    if task.get("linear_probe", True):
        out |= _probe(_features(ctx, train.images, False, bs), train.labels, test_feats, test.labels, task)
    return out


class SkipTask(Exception):
    """A task that does not apply to this run (e.g. a streamed training split); the suite goes on."""


def _in_memory_split(ctx: Context, split: str):
    from ncu.data.datamodule import PairDataset

    ds = ctx.datamodule.datasets[split]
    if not isinstance(ds, PairDataset):
        raise SkipTask(f"the {split} split is streamed from shards, not held in memory")
    return ds


def _own_images(ctx: Context, split: str) -> tuple[list, list[str]]:
    """Each row's own image of a split (not the image a noisy training pair shows) and its category."""
    from ncu.data.images import load_image

    ds = _in_memory_split(ctx, split)
    cats = [str(c) for c in ds.frame["category"]]
    if split != "train":  # clean splits: image_index maps each kept row to its own image
        return [ds.images[i] for i in ds.image_index], cats
    if len(ds.images) == len(ds.frame):  # nothing skipped: row k of the frame is image k
        return list(ds.images), cats
    max_side = ctx.datamodule.data_cfg.get("max_side", 128)
    images, kept = [], []
    for path, cat in zip(ds.frame["image"], cats):
        try:
            images.append(load_image(path, max_side))
            kept.append(cat)
        except Exception as e:  # noqa: BLE001 - skipped like the data module skips unreadable files
            log.warning("skipping unreadable image %s (%s)", path, type(e).__name__)
    return images, kept


def task_category_probe(name: str, task: dict, ctx: Context) -> dict[str, float]:
    bs = task.get("batch_size", 256)
    train_images, train_cats = _own_images(ctx, task.get("train_split", "train"))
    test_images, test_cats = _own_images(ctx, task.get("test_split", "test"))
    index = {c: i for i, c in enumerate(sorted(set(train_cats) | set(test_cats)))}
    if len(set(train_cats)) < 2:
        raise ConfigError(f"task {name!r}: the training split has fewer than two categories")
    train_labels = torch.tensor([index[c] for c in train_cats])
    test_labels = torch.tensor([index[c] for c in test_cats])
    train_feats, test_feats = _features(ctx, train_images, False, bs), _features(ctx, test_images, False, bs)
    out = _probe(train_feats, train_labels, test_feats, test_labels, task)
    return out | {"num_classes": float(len(index))}


def batch_nc_scores(v: torch.Tensor, t: torch.Tensor, scale: float, batch_size: int, ratio: float,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair NC scores and flags within ``ceil(N / batch_size)`` near-equal random batches of pairs."""
    from ncu.objectives.ncu import nc_scores, select_nc

    n = len(v)
    order = np.random.default_rng(seed).permutation(n)
    scores = torch.empty(n)
    flagged = torch.zeros(n, dtype=torch.bool)
    for chunk in np.array_split(order, max(1, math.ceil(n / batch_size))):
        idx = torch.from_numpy(chunk)
        s = nc_scores(v[idx], t[idx], scale).cpu()
        scores[idx] = s
        flagged[idx] = select_nc(s, ratio)
    return scores, flagged


def task_detection(name: str, task: dict, ctx: Context) -> dict[str, float]:
    from ncu.eval.benchmarks import encode_texts
    from ncu.eval.detection import detection_metrics
    from ncu.eval.plots import score_histogram
    from ncu.objectives.ncu import nc_scores, select_nc

    ds = _in_memory_split(ctx, "train")
    model = ctx.ready()
    images = [ds.images[i] for i in ds.image_index]  # the image each caption was trained with
    v = _features(ctx, images, True, task.get("eval_batch_size", 256))
    t = encode_texts(model, ctx.tokenizer, ds.frame["caption"].tolist(), ctx.device, normalize=True)
    noisy = torch.as_tensor(np.asarray(ds.noisy, dtype=bool))
    scale = float(model.logit_scale.detach().exp())
    ratio = task.get("nc_ratio")
    ratio = float(ctx.run_cfg.method.nc_ratio if ratio is None else ratio)
    scope = task.get("scope", "batch")
    batch_size = int(task.get("batch_size") or ctx.run_cfg.data.batch_size)
    if scope == "batch":
        scores, flagged = batch_nc_scores(v, t, scale, batch_size, ratio, task.get("seed", 0))
    elif scope == "full":
        scores = nc_scores(v, t, scale).cpu()
        flagged = select_nc(scores, ratio)
    else:
        raise ConfigError(f"benchmark.tasks.{name}.scope={scope!r} is unknown; choose batch or full")
    measured = detection_metrics(scores, noisy, flagged)
    out = {k: v for k, v in measured.items() if not math.isnan(v)}  # undefined ones (noise rate 0) left out
    within = f"batches of {batch_size}" if scope == "batch" else "the full split"
    title = f"NC scores within {within}: AUROC {measured['auroc']:.3f}"
    score_histogram(scores, noisy, ctx.out_dir / f"{name}_scores.png", title=title)
    np.savez(ctx.out_dir / f"{name}_scores.npz", scores=scores.numpy(), noisy=noisy.numpy(),
             flagged=flagged.numpy())
    return out | {"noise_rate": float(noisy.float().mean()), "nc_ratio": ratio,
                  "num_pairs": float(len(scores))}


def classification_set(path: str, task: dict):
    """An image folder per class, or a CSV of (image, label)."""
    from ncu.eval.benchmarks import CsvClassification, ImageFolderClassification

    if Path(path).is_dir():
        ds = ImageFolderClassification(path)
        if all(c.isdigit() for c in ds.classnames):  # ImageNet-V2 style: folder name = class index
            ds.samples = [(im, int(ds.classnames[label])) for im, label in ds.samples]
            ds.classnames = [str(i) for i in range(max(int(c) for c in ds.classnames) + 1)]
        return ds
    columns = columns_of(task, CLASSIFICATION_COLUMNS)
    return CsvClassification(path, columns["image_key"], columns["label_key"], root=task.get("root"),
                             sep=task.get("sep", ","))


def class_prompts(task: dict, names: list[str]) -> tuple[list[str], list]:
    """Class names and templates of a zero-shot task (``classnames``: null, ``imagenet`` or a file)."""
    from ncu.eval.benchmarks import load_classnames_templates, named_templates

    source = task.get("classnames")
    if source is None:
        classnames, templates = names, list(DEFAULT_TEMPLATES)
    elif source == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        classnames, templates = list(IMAGENET_CLASSNAMES), named_templates("imagenet")
    else:
        classnames, templates = load_classnames_templates(source)
    chosen = task.get("templates")
    if chosen:  # a list of strings with {}, or a named set: imagenet (80 OpenAI) or laclip (LaCLIP's 7)
        templates = named_templates(chosen) if isinstance(chosen, str) else list(chosen)
    return classnames, templates


def align_labels(ds, classnames: list[str], where: str) -> None:
    """Make ``ds``'s labels index ``classnames``: by name when every data class is one of them, else by
    position (sorted folders such as ImageNet's WordNet ids, or integer labels)."""
    if set(ds.classnames) <= set(classnames):
        index = {name: i for i, name in enumerate(classnames)}
        ds.samples = [(image, index[ds.classnames[label]]) for image, label in ds.samples]
    elif len(ds.classnames) != len(classnames) and not (
            all(c.isdigit() for c in ds.classnames) and len(ds.classnames) <= len(classnames)):
        raise ConfigError(f"{where}: {len(ds.classnames)} classes in the data but {len(classnames)} class "
                          "names, and the data's class names are not among them")
    ds.classnames = list(classnames)


def task_zeroshot_folder(name: str, task: dict, ctx: Context) -> dict[str, float]:
    ds = classification_set(task["data"], task)
    classnames, templates = class_prompts(task, ds.classnames)
    align_labels(ds, classnames, task["data"])
    feats = _features(ctx, ds.images, True, task.get("batch_size", 64))
    return _zeroshot(ctx, feats, ds.labels, classnames, templates, task.get("topk", [1, 5]))


def task_retrieval_csv(name: str, task: dict, ctx: Context) -> dict[str, float]:
    from ncu.eval.benchmarks import evaluate_retrieval_csv

    columns = columns_of(task, RETRIEVAL_COLUMNS)
    return evaluate_retrieval_csv(ctx.ready(), ctx.preprocess, ctx.tokenizer, task["csv"],
                                  columns["image_key"], columns["caption_key"], ctx.device,
                                  chunk_size=task.get("chunk_size", 1024),
                                  batch_size=task.get("batch_size", 64), root=task.get("root"),
                                  coco_fold_size=task.get("coco_fold_size"), sep=task.get("sep"))


def task_linear_probe_folder(name: str, task: dict, ctx: Context) -> dict[str, float]:
    train, test = classification_set(task["train"], task), classification_set(task["test"], task)
    if train.classnames != test.classnames:
        raise ConfigError(f"task {name!r}: train and test sets have different classes")
    bs = task.get("batch_size", 64)
    train_feats, test_feats = _features(ctx, train.images, False, bs), _features(ctx, test.images, False, bs)
    return _probe(train_feats, train.labels, test_feats, test.labels, task)


TASKS: dict[str, Callable[[str, dict, Context], dict[str, float]]] = {
    "run_test": task_run_test,
    "digits": task_digits,
    "category_probe": task_category_probe,
    "detection": task_detection,
    "zeroshot_folder": task_zeroshot_folder,
    "retrieval_csv": task_retrieval_csv,
    "linear_probe_folder": task_linear_probe_folder,
}
