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
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ncu.config import ConfigError
from ncu.models.factory import ModelBundle, create, read_checkpoint
from ncu.eval.tasks import CLASSIFICATION_COLUMNS, RETRIEVAL_COLUMNS, TASKS, Context, SkipTask, columns_of
from ncu.run import build, single_log_stream, write_json

log = logging.getLogger(__name__)

PRETRAINED = "pretrained"
# Task kinds that need the run's data module (its splits, categories and noise artifact).
RUN_DATA_KINDS = ("run_test", "category_probe", "detection")
# Task keys holding paths, checked before anything is built.
PATH_KEYS = {"zeroshot_folder": ("data", "classnames", "root"), "retrieval_csv": ("csv", "root"),
             "linear_probe_folder": ("train", "test", "root")}
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
