"""Evaluation datasets and encoders: zero-shot classification sets, retrieval CSVs, feature extraction.

Datasets are plain objects (``samples``: list of (image, label index), ``classnames``); an image is a path
or a PIL image. Nothing here downloads: ImageNet-style folders and CSVs are prepared by the user, and the
small built-in set (:func:`digits_dataset`) comes with scikit-learn.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import Tensor

from ncu.data.images import load_image, to_8bit
from ncu.eval.linear_probe import stratified_split
from ncu.eval.retrieval import retrieval_metrics
from ncu.eval.zeroshot import zero_shot_accuracy, zero_shot_classifier

ImageLike = str | os.PathLike | Image.Image
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# CLIP's prompt for MNIST-like digits.
DIGIT_TEMPLATES = ('a photo of the number: "{}".',)


# ---------------------------------------------------------------------------------------------------------
# Class names and templates


def _imagenet_classnames() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def _imagenet_templates() -> list[str]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    # open_clip stores them as one-argument lambdas; calling one with "{}" gives back the format string.
    return [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]


def named_templates(name: str) -> list[str]:
    """Template sets by name: ``imagenet`` (the 80 OpenAI ImageNet templates) or ``laclip`` (the 7 that
    LaCLIP's ``eval_zeroshot_imagenet.py`` uses for its CC3M/CC12M/RedCaps models: open_clip's
    ``SIMPLE_IMAGENET_TEMPLATES``; its LAION models are evaluated with the 80)."""
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    if name == "imagenet":
        return _imagenet_templates()
    if name == "laclip":
        return [template("{}") for template in SIMPLE_IMAGENET_TEMPLATES]
    raise ValueError(f"unknown template set {name!r}: imagenet (80 OpenAI templates) or laclip (LaCLIP's 7)")


def load_classnames_templates(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Read class names and prompt templates from a YAML or JSON file with keys ``classes`` and ``templates``.

    ``classes`` is a list of names and ``templates`` a list of strings holding ``{}``; ``classes: imagenet``
    gives open_clip's 1000 ImageNet class names, ``templates: imagenet`` / ``laclip`` a named template set
    (:func:`named_templates`). The file
    is parsed as data only (never evaluated as Python).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-names/templates file not found: {path}")
    text = path.read_text()
    data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with keys 'classes' and 'templates'")
    missing = [key for key in ("classes", "templates") if key not in data]
    if missing:
        raise KeyError(f"{path}: missing key(s) {missing}; expected 'classes' and 'templates'")

    classes, templates = data["classes"], data["templates"]
    classnames = _imagenet_classnames() if classes == "imagenet" else classes
    template_list = named_templates(templates) if isinstance(templates, str) else templates
    if not isinstance(classnames, list) or not classnames or not all(isinstance(c, str) for c in classnames):
        raise ValueError(f"{path}: 'classes' must be a non-empty list of strings or 'imagenet'")
    if not isinstance(template_list, list) or not template_list:
        raise ValueError(f"{path}: 'templates' must be a non-empty list of strings or 'imagenet'")
    bad = [t for t in template_list if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise ValueError(f"{path}: templates need a '{{}}' placeholder for the class name: {bad[:3]}")
    return [str(c) for c in classnames], list(template_list)


# ---------------------------------------------------------------------------------------------------------
# Classification datasets


@dataclass
class ClassificationDataset:
    """Images with integer labels indexing ``classnames``."""

    samples: list[tuple[ImageLike, int]]
    classnames: list[str]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[ImageLike, int]:
        return self.samples[index]

    @property
    def images(self) -> list[ImageLike]:
        return [image for image, _ in self.samples]

    @property
    def labels(self) -> Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def subset(self, indices: Sequence[int]) -> ClassificationDataset:
        return ClassificationDataset([self.samples[i] for i in indices], list(self.classnames))


class ImageFolderClassification(ClassificationDataset):
    """``root/<class name>/<image>``: one class per sub-folder (sorted by name), images sorted inside."""

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> None:
        classes = image_folder_classes(root, extensions)
        samples = [(path, label) for label, paths in enumerate(classes.values()) for path in paths]
        super().__init__(samples, list(classes))


def image_folder_classes(root: str | os.PathLike,
                         extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, list[str]]:
    """``{class name: its image files}`` of ``root/<class name>/<image>`` (classes and files sorted by name);
    ``DataError`` naming the folder when it has no class sub-folder or a class sub-folder holds no image (a
    class the data cannot score). Reads the folder listing only."""
    from ncu.errors import DataError

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    exts = tuple(e.lower() for e in extensions)
    classes = {p.name: sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in exts)
               for p in sorted(root.iterdir(), key=lambda p: p.name) if p.is_dir()}
    if not classes:
        raise DataError(f"{root} has no class sub-folders (an image folder holds one folder of images per class)")
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise DataError(f"{root}: {len(empty)} of {len(classes)} class folders hold no image with an extension in "
                        f"{', '.join(exts)}, e.g. {empty[:3]}")
    return classes


class CsvClassification(ClassificationDataset):
    """A CSV with an image column and a label column (a class name or an integer class index).

    Relative image paths are resolved against ``root`` (default: the CSV's folder). Without ``classnames``,
    name labels give the sorted unique names and integer labels give the names ``"0" .. str(max)``. With
    ``classnames``, a label is looked up as a name first, then read as an index.
    """

    def __init__(
        self,
        csv: str | os.PathLike,
        image_key: str,
        label_key: str,
        classnames: Sequence[str] | None = None,
        root: str | os.PathLike | None = None,
        sep: str = ",",
    ) -> None:
        frame = _read_csv(csv, [image_key, label_key], sep)
        root = Path(root) if root is not None else Path(csv).parent
        raw = [str(v).strip() for v in frame[label_key]]
        is_int = all(re.fullmatch(r"\d+", v) for v in raw)
        if classnames is None:
            names = [str(i) for i in range(max(int(v) for v in raw) + 1)] if is_int else sorted(set(raw))
        else:
            names = list(classnames)
        index = {name: i for i, name in enumerate(names)}
        labels = []
        for value in raw:
            if value in index:
                labels.append(index[value])
            elif re.fullmatch(r"\d+", value) and int(value) < len(names):
                labels.append(int(value))
            else:
                raise ValueError(
                    f"{csv}: label {value!r} is neither a class name nor an index < {len(names)}"
                )
        images = [_resolve(root, p) for p in frame[image_key]]
        super().__init__(list(zip(images, labels)), names)


def _read_csv(csv: str | os.PathLike, columns: Sequence[str], sep: str) -> pd.DataFrame:
    if not Path(csv).is_file():
        raise FileNotFoundError(f"CSV not found: {csv}")
    frame = pd.read_csv(csv, sep=sep, dtype=str, keep_default_na=False)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"{csv}: missing column(s) {missing}; columns are {list(frame.columns)}")
    return frame


def _resolve(root: Path, path: str) -> str:
    return path if os.path.isabs(path) else str(root / path)


def digits_dataset(
    split: str = "all", size: int = 32, test_frac: float = 0.25, seed: int = 0
) -> ClassificationDataset:
    """scikit-learn's 1,797 real 8x8 handwritten digits as RGB PIL images (no download).

    Pixels (0..16) are scaled to 0..255 (white digit on black, like MNIST) and upscaled to ``size`` with
    nearest-neighbour resampling. Labels 0..9, class names ``"zero" .. "nine"`` (use with
    :data:`DIGIT_TEMPLATES`). ``split`` is ``"all"``, ``"train"`` or ``"test"``: a deterministic
    class-stratified split with ``test_frac`` of each class in ``test``.
    """
    from sklearn.datasets import load_digits

    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    if split == "all":
        indices = np.arange(len(labels))
    else:
        train, test = stratified_split(labels, test_frac, seed)
        indices = train if split == "train" else test
    samples: list[tuple[ImageLike, int]] = [
        (Image.fromarray(pixels[i]).resize((size, size), Image.NEAREST).convert("RGB"), int(labels[i]))
        for i in indices
    ]
    return ClassificationDataset(samples, list(DIGIT_NAMES))


# ---------------------------------------------------------------------------------------------------------
# Encoders


def _open(image: ImageLike) -> Image.Image:
    # An in-memory 16-bit image is scaled like a file is (convert("RGB") alone clips it to white).
    return to_8bit(image).convert("RGB") if isinstance(image, Image.Image) else load_image(str(image))


def _encode_in_batches(model: torch.nn.Module, n: int, batch_size: int, encode: Callable[[int, int], Tensor],
                       what: str) -> Tensor:
    """``encode(start, stop)`` over [0, n) in eval mode (the model's mode is restored), float32 on CPU."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            chunks = [encode(i, i + batch_size).float().cpu() for i in range(0, n, batch_size)]
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError(f"no {what} to encode")
    return torch.cat(chunks)


def encode_images(
    model: torch.nn.Module,
    preprocess: Callable[[Image.Image], Tensor],
    images: Sequence[ImageLike],
    device: str | torch.device,
    batch_size: int = 64,
    normalize: bool = True,
) -> Tensor:
    """Image embeddings (N, d), float32 on CPU, computed in eval mode (the model's mode is restored)."""

    def encode(i: int, j: int) -> Tensor:
        batch = torch.stack([preprocess(_open(im)) for im in images[i:j]])
        return model.encode_image(batch.to(device), normalize=normalize)

    return _encode_in_batches(model, len(images), batch_size, encode, "images")


def encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    texts: Sequence[str],
    device: str | torch.device,
    batch_size: int = 256,
    normalize: bool = True,
) -> Tensor:
    """Text embeddings (N, d), float32 on CPU, computed in eval mode (the model's mode is restored)."""

    def encode(i: int, j: int) -> Tensor:
        return model.encode_text(tokenizer(list(texts[i:j])).to(device), normalize=normalize)

    return _encode_in_batches(model, len(texts), batch_size, encode, "texts")


# ---------------------------------------------------------------------------------------------------------
# Zero-shot classification


def evaluate_zeroshot(
    model: torch.nn.Module,
    preprocess: Callable[[Image.Image], Tensor],
    tokenizer: Callable,
    dataset: ClassificationDataset,
    templates: Sequence[str | Callable[[str], str]],
    device: str | torch.device,
    batch_size: int = 64,
    topk: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Zero-shot top-k accuracy in percent, classifying into ``dataset.classnames`` with ``templates``."""
    features = encode_images(model, preprocess, dataset.images, device, batch_size, normalize=True)
    return zeroshot_of_features(model, tokenizer, features, dataset.labels, dataset.classnames, templates,
                                device, topk)


def zeroshot_of_features(
    model: torch.nn.Module,
    tokenizer: Callable,
    features: Tensor,
    labels: Tensor,
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    device: str | torch.device,
    topk: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Zero-shot top-k accuracy in percent of image ``features`` (normalised here, so features computed for
    a linear probe can be reused) against the prompt classifier, built in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            classifier = zero_shot_classifier(model, tokenizer, list(classnames), templates, device)
    finally:
        model.train(was_training)
    return zero_shot_accuracy(F.normalize(features.float(), dim=-1), labels, classifier.cpu(), tuple(topk))


# ---------------------------------------------------------------------------------------------------------
# Retrieval


@dataclass
class RetrievalSet:
    """Unique images, all captions, and the image index of each caption."""

    images: list[str]
    captions: list[str]
    text_to_image: Tensor


def read_retrieval_csv(
    csv_path: str | os.PathLike,
    image_key: str,
    caption_key: str,
    root: str | os.PathLike | None = None,
    sep: str | None = None,
) -> RetrievalSet:
    """:func:`ncu.data.sources.read_retrieval_csv` as a :class:`RetrievalSet`: unique images in
    first-appearance order, captions in row order, relative paths against ``root`` (default: the CSV's
    folder)."""
    from ncu.data.sources import read_retrieval_csv as read_table

    images, captions, text_to_image = read_table(csv_path, image_key, caption_key, sep, root)
    return RetrievalSet(images, captions, torch.from_numpy(text_to_image))


def coco_1k_5k(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    fold_size: int = 1000,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """MSCOCO protocol: ``1k/*`` = mean over folds of ``fold_size`` consecutive images (each with its own
    captions, retrieved among the fold only), ``5k/*`` = the whole set.

    The number of images must be a multiple of ``fold_size`` (5,000 = 5 folds for the COCO 5K test split).
    """
    num_images = image_features.shape[0]
    if fold_size < 1 or num_images % fold_size:
        raise ValueError(f"{num_images} images do not split into folds of {fold_size}")
    targets = text_to_image.long()
    folds = []
    for start in range(0, num_images, fold_size):
        in_fold = (targets >= start) & (targets < start + fold_size)
        folds.append(
            retrieval_metrics(
                image_features[start : start + fold_size],
                text_features[in_fold],
                targets[in_fold] - start,
                chunk_size=chunk_size,
            )
        )
    out = {f"1k/{key}": float(np.mean([fold[key] for fold in folds])) for key in folds[0]}
    full = retrieval_metrics(image_features, text_features, targets, chunk_size=chunk_size)
    return out | {f"5k/{key}": value for key, value in full.items()}


def evaluate_retrieval_csv(
    model: torch.nn.Module,
    preprocess: Callable[[Image.Image], Tensor],
    tokenizer: Callable,
    csv_path: str | os.PathLike,
    image_key: str,
    caption_key: str,
    device: str | torch.device,
    chunk_size: int = 1024,
    batch_size: int = 64,
    root: str | os.PathLike | None = None,
    coco_fold_size: int | None = None,
    sep: str | None = None,
) -> dict[str, Any]:
    """Image-text retrieval on a CSV with one row per (image, caption); see :func:`read_retrieval_csv`.

    Returns :func:`ncu.eval.retrieval.retrieval_metrics` on the whole set or, with ``coco_fold_size``
    (1000 for MSCOCO 5K), the ``1k/*`` and ``5k/*`` metrics of :func:`coco_1k_5k`.
    """
    data = read_retrieval_csv(csv_path, image_key, caption_key, root, sep)
    image_features = encode_images(model, preprocess, data.images, device, batch_size, normalize=True)
    text_features = encode_texts(model, tokenizer, data.captions, device, normalize=True)
    if coco_fold_size is not None:
        return coco_1k_5k(image_features, text_features, data.text_to_image, coco_fold_size, chunk_size)
    return retrieval_metrics(image_features, text_features, data.text_to_image, chunk_size=chunk_size)
