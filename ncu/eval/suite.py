"""evaluate(cfg): evaluate a training run's checkpoint, or a pre-trained model, on a benchmark suite.

    python evaluate.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt              # benchmark=embedded
    python evaluate.py ckpt_path=<ckpt> benchmark=paper benchmark.tasks.imagenet.data=/data/imagenet/val ...
    python evaluate.py ckpt_path=pretrained model=vit_b16 model.pretrained=openai
    python evaluate.py -m ckpt_path=<a.ckpt>,<b.ckpt>

Model and data. With a checkpoint, the run is rebuilt from the config saved in the checkpoint
(architecture, preprocessing, tokenizer, data, noise, method) and the checkpoint's CLIP weights are loaded.
With ``ckpt_path=pretrained`` the model is ``cfg.model`` (any open_clip name with a tag or weights file, or a
``LaCLIP-*`` model, see below) and the data-dependent tasks use ``cfg.run_defaults`` (the training defaults:
embedded pairs, caption noise at 40%, method ``clip``). ``run_overrides`` is merged on top in both cases.

Suites. ``conf/benchmark/<name>.yaml`` holds ``name`` and ``tasks``: task name -> task config whose ``kind``
selects the evaluation (``benchmark.tasks.<task>=null`` drops one). Every metric is written as
``eval/<task>/<metric>``; ``eval/mean/zeroshot_top1`` (and top-5) averages the zero-shot classification tasks.
A task that does not apply (a training split streamed from shards) is skipped with a warning and listed
in ``meta.json``.

- ``run_test``: retrieval and zero-shot over the categories on the run's clean test split, exactly the
  ``test/*`` metrics of ``train.py`` (``alias_prefix: test`` writes them under ``test/`` as well).
- ``digits``: zero-shot and linear probe on scikit-learn's 1,797 handwritten digits (class-stratified
  75/25 split; both figures on the test part; prompt ``a photo of the number: "{}".``).
- ``category_probe``: linear probe on the run's data categories (emoji groups for the embedded pairs):
  features of the clean images of the training split (each row's own image) vs. the test split.
- ``detection``: noisy-correspondence detection on the run's noisy training split, see below.
- ``zeroshot_folder``: zero-shot classification of ``data`` (an image folder per class, or a CSV with
  ``image_key``/``label_key`` columns) with ``classnames`` (a YAML/JSON file with ``classes`` and
  ``templates``, ``imagenet`` for open_clip's 1000 class names and 80 templates, or null for the folder/label
  names); ``templates`` overrides the prompts: a list, ``imagenet`` (80 OpenAI) or ``laclip`` (LaCLIP's 7). Data classes are matched to the class names by name when they are among them,
  otherwise by position: folders in sorted order (ImageNet's WordNet ids), sub-folders named ``0``..``999``
  (the ImageNet-V2 layout) and integer CSV labels as class indices.
- ``retrieval_csv``: image-text retrieval on a CSV with one row per (image, caption) (Flickr30K / MSCOCO
  Karpathy test layout); ``coco_fold_size: 1000`` gives MSCOCO ``1k/*`` (mean over 5 folds) and ``5k/*``.
- ``linear_probe_folder``: linear probe with ``train`` and ``test`` sets (folder or CSV each).

Linear-probe recipe (:mod:`ncu.eval.linear_probe`): frozen image embeddings (after the projection, not
L2-normalised) of the val transform; standardised with the training statistics; multinomial L2 logistic
regression (L-BFGS, ``max_iter``); ``C`` picked from ``Cs`` by accuracy on a class-stratified ``val_frac`` of
the training features (ties: the smaller ``C``), then refitted on all training features and scored on the
test features. The paper's code trains a linear layer with AdamW instead; logistic regression is the CLIP
paper's recipe and is deterministic.

Noise detection. Features of the whole training split are computed in eval mode with the val transform
(each caption with the image it was shown with in training). With ``scope: batch`` (default) the split is
shuffled with ``seed`` and cut into ``ceil(N / B)`` near-equal batches of at most ``B`` = the run's global
batch size; each pair's score is the softmax probability of its own caption among its batch's captions
(``ncu.objectives.ncu.nc_scores``, as in training), and ``select_nc`` flags the ``method.nc_ratio`` lowest
scores of every batch. ``scope: full`` scores every pair against all the split's captions and flags the
lowest ``nc_ratio`` overall (an N x N matrix: small splits only). AUROC/AUPRC rank the scores against the
noise artifact's mask; precision/recall/F1 are those of the flags; values in [0, 1]. The histogram of
clean vs. noisy scores is saved as ``<task>_scores.png`` next to ``metrics.json``, and the per-pair
``scores``, ``noisy`` and ``flagged`` arrays (training-split order) as ``<task>_scores.npz``.

LaCLIP checkpoints (the models NCU starts from): ``model.name=LaCLIP-ViT-B-16`` is built with LaCLIP's
architecture and preprocessing (QK-norm timm ViT, ImageNet normalisation) and ``model.pretrained`` is the
LaCLIP ``.pt`` file (CC3M, CC12M, RedCaps); LaCLIP's LAION-400M checkpoints are open_clip models, loaded under
open_clip's names (``model.name=ViT-B-32``)::

    python evaluate.py ckpt_path=pretrained model.name=LaCLIP-ViT-B-16 model.pretrained=vitb16_cc3m_clip.pt \\
        benchmark=imagenet benchmark.tasks.imagenet.data=/data/imagenet/val benchmark.tasks.imagenet.templates=laclip

As a check of the import, LaCLIP reports ~15.8% ImageNet zero-shot top-1 for its CC3M CLIP ViT-B/16
checkpoint (40.2% for CC12M) with the 7 templates of its ``eval_zeroshot_imagenet.py`` (``templates=laclip``).

Outputs: ``<run_dir>/eval/<date>_<suite>/metrics.json`` (flat, float values), ``meta.json`` (what was
evaluated), plots, and a printed table. ``<run_dir>`` is the training run's folder (the checkpoint's
``checkpoints/`` parent), ``logs/models/<model.name>`` for a pre-trained model; a multirun writes each job
there too (suffix ``_<job number>``), with ``multirun.yaml`` under ``logs/eval/multiruns/``. With
``logger=wandb`` the metrics also go to a wandb run with ``job_type=eval`` in the training run's group
(offline unless ``logger.wandb.offline=false``).
"""
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
from omegaconf import DictConfig, OmegaConf

from ncu.config import ConfigError
from ncu.models.factory import ModelBundle, create, read_checkpoint
from ncu.run import build, single_log_stream, test_metrics, write_json

log = logging.getLogger(__name__)

PRETRAINED = "pretrained"
# Task kinds that need the run's data module (its splits, categories and noise artifact).
RUN_DATA_KINDS = ("run_test", "category_probe", "detection")
# Task keys holding paths, checked before anything is built.
PATH_KEYS = {"zeroshot_folder": ("data", "classnames", "root"), "retrieval_csv": ("csv", "root"),
             "linear_probe_folder": ("train", "test", "root")}
DEFAULT_TEMPLATES = ("a photo of a {}.",)
# CSV column keys of the tasks and their defaults when a task config leaves them out.
RETRIEVAL_COLUMNS = {"image_key": "filepath", "caption_key": "caption"}
CLASSIFICATION_COLUMNS = {"image_key": "image", "label_key": "label"}


def columns_of(task: dict, defaults: dict[str, str]) -> dict[str, str]:
    return {role: task.get(role, default) for role, default in defaults.items()}


def load_run_config(ckpt_path: str, trusted: bool = False) -> DictConfig:
    """The resolved config a checkpoint was trained with (stored in its hyper-parameters)."""
    if not Path(ckpt_path).exists():
        raise ConfigError(f"ckpt_path={ckpt_path!r}: file not found")
    ckpt = read_checkpoint(ckpt_path, trusted)
    config = (ckpt.get("hyper_parameters") or {}).get("config") if isinstance(ckpt, dict) else None
    if not config:
        raise ConfigError(f"{ckpt_path} carries no run config: was it written by train.py?")
    return OmegaConf.create(config)


# ---------------------------------------------------------------------------------------------------------
# Suite and model set-up


def suite_tasks(benchmark: DictConfig) -> dict[str, dict]:
    """The suite's enabled tasks as plain dicts; one clear error for an unset or missing path."""
    tasks = benchmark.get("tasks")
    if not tasks:
        raise ConfigError(f"benchmark {benchmark.get('name')!r} has no tasks")
    # Keys come back with their full path (benchmark.tasks.<task>.<key>).
    unset = sorted(OmegaConf.missing_keys(tasks))
    if unset:
        raise ConfigError(f"benchmark {benchmark.get('name')!r} needs paths that are not set (???): pass "
                          + " ".join(f"{key}=<path>" for key in unset))
    out: dict[str, dict] = {}
    for name, task in tasks.items():
        if task is None:
            continue
        task = OmegaConf.to_container(task, resolve=True)
        kind = task.get("kind")
        if kind not in TASKS:
            raise ConfigError(f"benchmark.tasks.{name}.kind={kind!r} is unknown; "
                              f"choose from {', '.join(TASKS)}")
        for key in PATH_KEYS.get(kind, ()):
            value = task.get(key)
            if value is not None and value != "imagenet" and not Path(value).exists():
                raise FileNotFoundError(f"benchmark.tasks.{name}.{key}={value}: no such file or folder")
        check_task_tables(str(name), task)
        out[str(name)] = task
    return out


def check_task_tables(name: str, task: dict) -> None:
    """Header rows of a task's CSVs, the listing of its image folders and its class-names file, read before
    any model is loaded (and before the output folder gets content), so a wrong column, an empty table or
    folder, or a class folder without images is one error naming the key instead of a traceback after
    encoding."""
    from ncu.data.sources import require_columns
    from ncu.eval.benchmarks import image_folder_classes, load_classnames_templates

    kind, hint = task["kind"], f"set benchmark.tasks.{name}.sep"
    if kind == "retrieval_csv":
        tables = {"csv": columns_of(task, RETRIEVAL_COLUMNS)}
    else:
        columns = columns_of(task, CLASSIFICATION_COLUMNS)
        tables = {key: columns for key in ("data", "train", "test") if key in PATH_KEYS.get(kind, ())}
    folders: dict[str, list[str]] = {}
    for key, columns in tables.items():
        path, where = task.get(key), f"benchmark.tasks.{name}.{key}"
        try:
            if path is not None and Path(path).is_file():
                if not require_columns(path, task.get("sep"), columns, sep_hint=hint):
                    raise ConfigError(f"{where}={path}: the table has a header but no data rows")
            elif path is not None and Path(path).is_dir():
                # An empty folder or a class folder without images: refused before the model.
                folders[key] = list(image_folder_classes(path))
        except (ValueError, KeyError) as e:  # DataError is a ValueError too
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{where}: {e.args[0] if e.args else e}") from e
    if kind == "linear_probe_folder" and len(folders) == 2 and folders["train"] != folders["test"]:
        differ = sorted(set(folders["train"]) ^ set(folders["test"]))
        raise ConfigError(f"benchmark.tasks.{name}: the train and test folders ({task['train']}, {task['test']}) "
                          f"have different class folders, e.g. {differ[:3]} in only one")
    try:
        if task.get("classnames") not in (None, "imagenet"):
            load_classnames_templates(task["classnames"])
    except (ValueError, KeyError) as e:
        raise ConfigError(f"benchmark.tasks.{name}: {e.args[0] if e.args else e}") from e


def create_bundle(model_cfg: DictConfig, trusted: bool) -> ModelBundle:
    """open_clip model, transforms and tokenizer of ``model.name`` with ``model.pretrained`` weights (a
    ``LaCLIP-*`` name reads LaCLIP's checkpoint format and preprocessing; see ``factory.create``)."""
    aug = OmegaConf.to_container(model_cfg.get("aug") or {}, resolve=True)
    return create(model_cfg.name, model_cfg.get("pretrained"), aug_cfg=aug, trusted=trusted)


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


def pick_device(accelerator: str) -> torch.device:
    use_cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return torch.device("cuda" if use_cuda else "cpu")


def make_context(cfg: DictConfig, tasks: dict[str, dict], out_dir: Path) -> Context:
    """Rebuild the run (checkpoint) or the pre-trained model; the data module only when a task needs it."""
    if cfg.ckpt_path == PRETRAINED:
        defaults = OmegaConf.to_container(cfg.run_defaults, resolve=True)
        run_cfg = OmegaConf.create({**defaults, "model": OmegaConf.to_container(cfg.model, resolve=True),
                                    "paths": OmegaConf.to_container(cfg.paths, resolve=True)})
    else:
        run_cfg = load_run_config(cfg.ckpt_path, cfg.trust_checkpoints)
        run_cfg.model.pretrained = str(Path(cfg.ckpt_path).resolve())
    run_cfg = OmegaConf.merge(run_cfg, cfg.get("run_overrides") or {})
    run_cfg.trust_checkpoints = cfg.trust_checkpoints  # this command's choice, never the checkpoint's
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    device = pick_device(trainer_kwargs.get("accelerator", "auto"))
    if not any(t["kind"] in RUN_DATA_KINDS for t in tasks.values()):
        bundle = create_bundle(run_cfg.model, cfg.trust_checkpoints)
        return Context(bundle.model, bundle.preprocess_val, bundle.tokenizer, device, out_dir, run_cfg,
                       trainer_kwargs)
    bundle, dm, module = build(run_cfg)
    return Context(module.model, bundle.preprocess_val, bundle.tokenizer, device, out_dir, run_cfg,
                   trainer_kwargs, dm, module)


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


# ---------------------------------------------------------------------------------------------------------
# Suite runner


def run_suite(tasks: dict[str, dict], ctx: Context) -> tuple[dict[str, float], dict[str, str]]:
    """Metrics of every task (``eval/<task>/<metric>``, plus aliases) and the skipped tasks (with why)."""
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name, task in tasks.items():
        log.info("evaluating %s (%s)", name, task["kind"])
        try:
            result = {k: float(v) for k, v in TASKS[task["kind"]](name, task, ctx).items()}
        except SkipTask as e:
            log.warning("task %s skipped: %s", name, e)
            skipped[name] = str(e)
            continue
        metrics |= {f"eval/{name}/{k}": v for k, v in result.items()}
        if task.get("alias_prefix"):
            metrics |= {f"{task['alias_prefix']}/{k}": v for k, v in result.items()}
    for k in ("top1", "top5"):
        # Classification sets only: the run's own test split is not a zero-shot transfer task.
        zs = [metrics[f"eval/{name}/zeroshot_{k}"] for name, task in tasks.items()
              if task["kind"] != "run_test" and f"eval/{name}/zeroshot_{k}" in metrics]
        if len(zs) > 1:
            metrics[f"eval/mean/zeroshot_{k}"] = float(np.mean(zs))
    return metrics, skipped


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.4f}"


def print_table(metrics: dict[str, float], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("task", "metric", "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    last = None
    for key, value in metrics.items():
        if not key.startswith("eval/"):
            continue  # aliases (test/*) repeat eval/<task>/*
        _, task, metric = key.split("/", 2)
        table.add_row(task if task != last else "", metric, _fmt(value))
        last = task
    Console().print(table)


def log_wandb(cfg: DictConfig, run_cfg: DictConfig, metrics: dict[str, float], meta: dict) -> None:
    """A wandb run with job_type=eval in the training run's group (offline unless configured otherwise)."""
    lcfg = (cfg.get("logger") or {}).get("wandb")
    if lcfg is None:
        return
    import wandb

    group = OmegaConf.select(run_cfg, "logger.wandb.group", default=None) or run_cfg.get("experiment_name")
    try:
        wandb.init(project=lcfg.get("project", "ncu"), entity=lcfg.get("entity"), group=group,
                   job_type="eval", name=f"eval-{meta['benchmark']}", dir=meta["out_dir"], config=meta,
                   mode="offline" if lcfg.get("offline", True) else "online")
        wandb.log(metrics)
    finally:
        if wandb.run is not None:
            wandb.finish()


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate ``cfg.ckpt_path`` (``pretrained``: ``cfg.model``) on ``cfg.benchmark``; write metrics.json."""
    single_log_stream()
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ConfigError("ckpt_path is not set: pass ckpt_path=<run_dir>/checkpoints/last.ckpt, or "
                          "ckpt_path=pretrained model=<name> model.pretrained=<tag or file>")
    tasks = suite_tasks(cfg.benchmark)  # config errors first, before any model or data is loaded
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.get("seed", 0), workers=True, verbose=False)
    ctx = make_context(cfg, tasks, out_dir)
    metrics, skipped = run_suite(tasks, ctx)
    model = ctx.run_cfg.model
    source = cfg.ckpt_path if cfg.ckpt_path != PRETRAINED else f"{model.name} ({model.pretrained})"
    meta = {"ckpt_path": str(cfg.ckpt_path), "model": str(model.name), "pretrained": str(model.pretrained),
            "benchmark": str(cfg.benchmark.name),
            "tasks": tasks, "skipped": skipped, "out_dir": str(out_dir)}
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "meta.json", meta)
    if cfg.get("print_table", True):
        print_table(metrics, f"{cfg.benchmark.name}: {source}")
    log_wandb(cfg, ctx.run_cfg, metrics, meta)
    return metrics, {"module": ctx.module, "datamodule": ctx.datamodule, "out_dir": out_dir, "context": ctx}
