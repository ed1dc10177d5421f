"""Image-caption pairs as a LightningDataModule: deterministic split, noisy training split, clean val/test.

Sources (``data.source``): ``embedded`` and ``csv`` decode every image once into memory (``PairDataset``);
``wds`` streams the training split from tar shards (``ncu.data.wds.ShardPairs``) and keeps only val/test in
memory. In every source the split is a hash of the sample key (the concept group for ``embedded``) and the
noise artifact is built on the training keys, so a pair's split and corruption never depend on file order.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ncu.choices import cache_key_view
from ncu.data import noise as noise_lib
from ncu.data.embedded import embedded_pairs, split_of, unit_hash
from ncu.data.images import load_image
from ncu.data.resumable import ResumableLoader
from ncu.data.streams import ShardLoader, ShardTrainSet, read_shard_samples
from ncu.errors import DataError

log = logging.getLogger(__name__)


def load_frame(cfg: dict) -> pd.DataFrame:
    """The pair table (columns key, image, caption, category, group) of a data config."""
    source = cfg.get("source", "embedded")
    if source == "embedded":
        return embedded_pairs(cfg.get("sources", ("twemoji", "tuxpaint")), cfg.get("skin_tones", True),
                              cfg.get("tuxpaint_dir", "/usr/share/tuxpaint/stamps"))
    if source == "csv":
        from ncu.data.sources import read_pairs_csv

        frame, stats = read_pairs_csv(cfg["path"], cfg.get("image_key", "image_path"),
                                      cfg.get("caption_key", "caption"), cfg.get("sep"),
                                      cfg.get("category_key"), cfg.get("key_key"))
        frame.attrs["stats"] = stats
        # Without a category column every pair is in one class; name it instead of leaving it empty.
        if (frame["category"].isna() | (frame["category"] == "")).all():
            frame["category"] = "none"
        return frame
    if source == "scenes":
        from ncu.data.scenes import scene_pairs

        return scene_pairs(cfg, cfg.get("cache_dir") or "data/scenes")
    raise ValueError(f"unknown data.source {source!r}; choose embedded, scenes, csv or wds")


class PairDataset(Dataset):
    """Pairs (image[image_index[k]], caption[k]) with images decoded once and kept in memory.

    ``image_index`` realises the noise: caption k is shown with image ``image_index[k]``.
    Unreadable image files are skipped (their pairs dropped) and counted in ``skipped``.
    ``blobs`` (encoded image bytes per row, None for a missing image) are decoded instead of the files in
    ``frame.image``, which then only names where each image came from (shard sources).
    """

    def __init__(self, frame: pd.DataFrame, transform: Callable | None = None, tokenizer: Callable | None = None,
                 image_index: np.ndarray | None = None, noisy: np.ndarray | None = None,
                 max_side: int | None = 128, blobs: Sequence[bytes | None] | None = None):
        self.transform, self.tokenizer = transform, tokenizer
        n = len(frame)
        image_index = np.arange(n) if image_index is None else np.asarray(image_index)
        noisy = np.zeros(n, dtype=bool) if noisy is None else np.asarray(noisy, dtype=bool)
        images: list[Image.Image | None] = []
        for i, path in enumerate(frame["image"]):
            try:
                if blobs is None:
                    images.append(load_image(path, max_side))
                elif blobs[i] is None:
                    raise FileNotFoundError(path)
                else:
                    images.append(load_image(io.BytesIO(blobs[i]), max_side))
            except Exception as e:  # noqa: BLE001 - any decoder error means "bad file"
                log.warning("skipping unreadable image %s (%s)", path, type(e).__name__)
                images.append(None)
        ok_image = np.array([im is not None for im in images], dtype=bool)
        keep = ok_image[image_index] & ok_image  # a pair needs its shown image (and its own, for the split)
        self.skipped = int((~keep).sum())
        self.frame = frame[keep].reset_index(drop=True)
        self.images = images
        self.image_index = image_index[keep]
        self.noisy = noisy[keep]

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, k: int) -> dict[str, Any]:
        image = self.images[self.image_index[k]]
        caption = self.frame.at[k, "caption"]
        item = {"caption": caption, "index": k, "noisy": bool(self.noisy[k])}
        item["image"] = self.transform(image) if self.transform else image
        if self.tokenizer is not None:
            item["text"] = self.tokenizer([caption])[0]
        return item


class PairDataModule(L.LightningDataModule):
    def __init__(self, data: dict, noise: dict, batch_size: int = 128, eval_batch_size: int = 256,
                 num_workers: int = 0, noise_dir: str = "data/noise", seed: int = 0):
        super().__init__()
        self.data_cfg, self.noise_cfg = dict(data), dict(noise)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.noise_dir, self.seed = num_workers, noise_dir, seed
        self.preprocess_train = self.preprocess_val = self.tokenizer = None
        self.datasets: dict[str, PairDataset | ShardTrainSet] = {}
        self.noise_artifact: noise_lib.NoiseArtifact | None = None
        self.noise_folder: Path | None = None
        self.dataset_key: str | None = None  # dataset_id() of the set-up data: keys noise and pretrain caches
        self.source_stats: dict[str, int] = {}
        # Class names of a dedicated zero-shot set (datasets["zeroshot"]); None: classify val/test by category.
        self.zeroshot_classnames: list[str] | None = None
        # data.shifts: per style, its test pairs and zero-shot images (PairDatasets), class names and counts.
        self.shifts: dict[str, dict[str, Any]] = {}
        self.pairs_per_s: float | None = None  # end-to-end training throughput of the last epoch
        self._passes = 0  # training passes started over a shard source (its shuffling epoch)

    def attach(self, preprocess_train: Callable, preprocess_val: Callable, tokenizer: Callable) -> None:
        """Use the model's own preprocessing and tokenizer so they always match the architecture."""
        self.preprocess_train, self.preprocess_val, self.tokenizer = preprocess_train, preprocess_val, tokenizer
        for name, ds in self.datasets.items():
            ds.transform = preprocess_train if name == "train" else preprocess_val
            ds.tokenizer = tokenizer

    @property
    def name(self) -> str:
        return self.data_cfg.get("name", "embedded")

    @property
    def source(self) -> str:
        return self.data_cfg.get("source", "embedded")

    # Loader settings do not change which pairs exist; everything else in the data config may.
    # The shifted styles (data.shifts) are evaluation sets beside the pairs.
    _LOADER_KEYS = ("batch_size", "eval_batch_size", "num_workers", "max_side", "shuffle_buffer", "index_cache",
                    "cache_dir", "shifts")

    def dataset_id(self, frame: pd.DataFrame) -> str:
        """Name of the noise-artifact folder: the data name plus a hash of what defines the pairs
        (e.g. sources, skin tones, limit) and, for the embedded set, of which sources are present
        (TuxPaint is optional). Other sources are identified by their config (path, shard list)."""
        spec = cache_key_view("data", {k: v for k, v in sorted(self.data_cfg.items()) if k not in self._LOADER_KEYS})
        if self.source == "embedded":
            spec["present"] = sorted({str(k).split(":")[0] for k in frame["key"]})
        return f"{self.name}-{hashlib.sha1(json.dumps(spec, default=str).encode()).hexdigest()[:8]}"

    def _fractions(self) -> tuple[float, float]:
        return self.data_cfg.get("val_frac", 0.1), self.data_cfg.get("test_frac", 0.2)

    def _subsample(self, part: pd.DataFrame, split: str) -> pd.DataFrame:
        """``data.limit`` (and ``data.eval_max_pairs`` for val/test) keep the pairs first in key-hash order:
        deterministic and independent of file order."""
        val_frac, test_frac = self._fractions()
        limit = self.data_cfg.get("limit")
        n = max(1, int(limit * {"train": 1.0, "val": val_frac, "test": test_frac}[split])) if limit else None
        cap = self.data_cfg.get("eval_max_pairs") if split != "train" else None
        if cap is not None:
            n = min(n, cap) if n is not None else cap
        if n is None:
            return part
        order = np.argsort(part["key"].map(lambda k: unit_hash(k, "limit")).to_numpy(), kind="stable")
        return part.iloc[order[:n]].reset_index(drop=True)

    def _build_noise(self, frame: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
        """Build or reuse the noise artifact of the training split; returns the split with its captions as
        corrupted (text protocols edit them; the others move captions to other images, ``perm``)."""
        self.dataset_key = self.dataset_id(frame)
        protocol, rate = self.noise_cfg.get("protocol", "caption"), self.noise_cfg.get("rate", 0.0)
        concepts = None
        if protocol in noise_lib.TEXT_PROTOCOLS:
            categories = frame["category"].unique() if "category" in frame.columns else []  # shards carry none
            concepts = sorted(str(c) for c in categories if str(c) not in ("", "none"))
            if not concepts:
                raise DataError(f"noise.protocol={protocol!r} replaces concepts named in captions by the data's "
                                f"category names; {self._source_name()} has none (a category column is needed)")
        self.noise_artifact, self.noise_folder, reused = noise_lib.build_or_load(
            self.noise_dir, self.dataset_key, train["key"].tolist(),
            train["caption"].tolist(), rate, protocol, self.noise_cfg.get("seed", 0),
            self.noise_cfg.get("derangement", False), concepts=concepts)
        log.info("noise artifact %s (%s): realised rate %.4f", self.noise_folder,
                 "reused" if reused else "created", self.noise_artifact.realised_rate)
        wanted = math.floor(rate * len(train))
        editable = self.noise_artifact.meta.get("editable")
        if concepts is not None and wanted > 0 and editable == 0:
            raise DataError(f"noise.protocol={protocol!r}: no training caption of {self._source_name()} names one "
                            f"of its {len(concepts)} category names (e.g. {concepts[:3]}), so none can be edited")
        if concepts is not None and editable is not None and editable < wanted:
            log.warning("noise.protocol=%s: only %d of the %d training captions name a category, fewer than the %d "
                        "that noise.rate=%g asks for: all of them are edited (realised rate %.4f)", protocol,
                        editable, len(train), wanted, rate, self.noise_artifact.realised_rate)
        return train.assign(caption=self.noise_artifact.captions(train["caption"].to_numpy()))

    def _source_name(self) -> str:
        """The data set as the user named it: its file for a CSV, its shard list for shards."""
        if self.source == "csv":
            return f"data.path={self.data_cfg.get('path')!r}"
        if self.source == "wds":
            return f"data.shards={self.data_cfg.get('shards')!r}"
        return f"data.source={self.source!r}"

    def _check_split_sizes(self, parts: dict[str, pd.DataFrame], source: str,
                           skipped: dict[str, int] | None = None) -> None:
        """Refuse, before any noise artifact or model work, a training split smaller than one batch and an
        evaluation split with fewer than two pairs (retrieval ranks a pair against the others); checked again
        once unreadable images are dropped (``skipped``: pairs each split lost with them), because the loader
        would otherwise fail later with a bare traceback."""
        sizes = {name: len(part) for name, part in parts.items()}
        skipped = skipped or {}

        def lost(name: str) -> str:
            n = skipped.get(name, 0)
            return (f" ({sizes[name]} kept of {sizes[name] + n}: {n} dropped because their images are unreadable)"
                    if n else "")

        if sizes["train"] < self.batch_size:
            raise DataError(f"{source}: the training split has {sizes['train']} pairs{lost('train')}, fewer than "
                            f"one batch (data.batch_size={self.batch_size}); split sizes {sizes}")
        small = [name for name in ("val", "test") if sizes[name] < 2]
        if small:
            raise DataError(f"{source}: the {' and '.join(small)} split has fewer than 2 pairs"
                            f"{''.join(lost(name) for name in small)} ({sizes}); "
                            "more data, or larger evaluation splits (data.val_frac / data.test_frac)")

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.source == "wds":
            self._setup_shards()
            return
        frame = load_frame(self.data_cfg)
        self.source_stats = dict(frame.attrs.get("stats", {}))
        val_frac, test_frac = self._fractions()
        # A source may fix its own splits (scenes: fresh compositions for val/test, a zero-shot set).
        split = (frame["split"] if "split" in frame.columns
                 else frame["group"].map(lambda g: split_of(g, val_frac, test_frac)))
        max_side = self.data_cfg.get("max_side", 128)
        parts = {name: self._subsample(frame[split == name].reset_index(drop=True), name)
                 for name in ("train", "val", "test")}
        self._check_split_sizes(parts, self._source_name())
        # Built aside and kept only once checked: a refused setup must not look done (setup() returns early).
        datasets: dict[str, PairDataset] = {}
        for name, part in parts.items():
            if name == "train":
                part = self._build_noise(frame, part)
                ds = PairDataset(part, self.preprocess_train, self.tokenizer, self.noise_artifact.perm,
                                 self.noise_artifact.noisy_mask, max_side)
            else:
                ds = PairDataset(part, self.preprocess_val, self.tokenizer, max_side=max_side)
            datasets[name] = ds
        self._check_split_sizes({name: ds.frame for name, ds in datasets.items()}, self._source_name(),
                                skipped={name: ds.skipped for name, ds in datasets.items()})
        if (split == "zeroshot").any():
            zs = frame[split == "zeroshot"].reset_index(drop=True)
            datasets["zeroshot"] = PairDataset(zs, self.preprocess_val, self.tokenizer, max_side=max_side)
            self.zeroshot_classnames = sorted(zs["category"].unique().tolist())
        self.datasets = datasets
        self.classnames = sorted(frame.loc[split != "zeroshot", "category"].unique().tolist())
        self.shifts = self._setup_shifts(max_side)

    def _setup_shifts(self, max_side: int) -> dict[str, dict[str, Any]]:
        """The scenes' test pairs and zero-shot images drawn in each style of ``data.shifts`` (a style this
        machine cannot draw is skipped with one line; emoji a style does not draw are left out and counted)."""
        from ncu.data.scenes import shifted_scene_pairs
        from ncu.data.styles import STYLES

        out: dict[str, dict[str, Any]] = {}
        for style in self.data_cfg.get("shifts") or []:
            why = STYLES[style].missing()
            if why:
                log.info("data.shifts: style %r skipped: it %s", style, why)
                continue
            frame = shifted_scene_pairs(self.data_cfg, self.data_cfg.get("cache_dir") or "data/scenes", style)
            counts = frame.attrs["style"]
            sets = {split: PairDataset(frame[frame["split"] == split].reset_index(drop=True), self.preprocess_val,
                                       self.tokenizer, max_side=max_side) for split in ("test", "zeroshot")}
            if counts["missing"]:
                log.info("data.shifts: %s draws %d of the %d concepts; left out: %s (%s pairs)", style,
                         counts["concepts_drawn"], counts["concepts"], ", ".join(counts["missing"]),
                         ", ".join(f"{n} {split}" for split, n in counts["left_out"].items()))
            if len(sets["test"]) < 2 or len(sets["zeroshot"]) < 1:
                log.info("data.shifts: style %r skipped: it draws too few of the concepts (%d test pairs)",
                         style, len(sets["test"]))
                continue
            out[style] = {**sets, "classnames": sorted(sets["zeroshot"].frame["category"].unique().tolist()),
                          "concepts_drawn": counts["concepts_drawn"], "concepts": counts["concepts"]}
        return out

    def _setup_shards(self) -> None:
        """Shard source: index pass (key, caption), hashed split of the keys, noise on the training keys; the
        training split streams (``ShardTrainSet``), val/test images are read once into ``PairDataset``s."""
        from ncu.data.shard_index import build_index
        from ncu.data.wds import ShardPairs, shard_weights

        cfg = self.data_cfg
        shards, weights = shard_weights(cfg["shards"], cfg.get("source_weights"))
        index = build_index(shards, cfg.get("index_cache"))
        self.source_stats = dict(index.attrs.get("stats", {}))
        val_frac, test_frac = self._fractions()
        # Shards carry no concept group: each key is its own group.
        split = index["key"].map(lambda k: split_of(k, val_frac, test_frac))
        parts = {name: self._subsample(index[split == name].reset_index(drop=True), name)
                 for name in ("train", "val", "test")}
        source = f"{self._source_name()} (index: {self.source_stats})"
        self._check_split_sizes(parts, source)
        train = parts["train"]
        self._build_noise(index, train)
        max_side = cfg.get("max_side", 128)
        per_epoch = (cfg.get("samples_per_epoch") or len(train)) if cfg.get("resampled") else None
        stream = ShardPairs.from_artifact(train, self.noise_artifact, transform=self.preprocess_train,
                                          tokenizer=self.tokenizer, seed=self.seed,
                                          shuffle_buffer=cfg.get("shuffle_buffer", 0) or 0, max_side=max_side,
                                          samples_per_epoch=per_epoch, weights=weights)
        train_set = ShardTrainSet(stream, per_epoch or len(train), self.num_workers, rows=len(train))
        wanted = set(parts["val"]["key"]) | set(parts["test"]["key"])
        found = read_shard_samples(shards, wanted)
        categories: set[str] = set()
        evaluation: dict[str, PairDataset] = {}
        for name in ("val", "test"):
            part = parts[name]
            rows = [found.get(k, (str(s), None, "none")) for k, s in zip(part["key"], part["shard"])]
            frame = pd.DataFrame({
                "key": part["key"].astype(str), "image": [f"{s}#{k}" for k, (s, _, _) in zip(part["key"], rows)],
                "caption": part["caption"].astype(str), "category": [c for _, _, c in rows],
                "group": part["key"].astype(str)})
            ds = PairDataset(frame, self.preprocess_val, self.tokenizer, max_side=max_side,
                             blobs=[b for _, b, _ in rows])
            evaluation[name] = ds
            categories.update(ds.frame["category"])
        # The training stream's own unreadable images are only met while streaming: its size stays the index's.
        self._check_split_sizes({"train": train, **{name: ds.frame for name, ds in evaluation.items()}}, source,
                                skipped={name: ds.skipped for name, ds in evaluation.items()})
        self.datasets = {"train": train_set, **evaluation}
        self.classnames = sorted(categories) or ["none"]

    # Saved in checkpoints: a resumed run goes on with new shard orders instead of repeating the first ones.
    def state_dict(self) -> dict[str, Any]:
        return {"shard_passes": self._passes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._passes = int(state_dict.get("shard_passes", 0))

    @property
    def skipped(self) -> int:
        """Unreadable images: pairs dropped from the in-memory splits, plus the undecodable images of the
        current (or last) pass over a shard source's training stream."""
        return sum(ds.skipped for ds in self.datasets.values())

    def stats(self) -> dict[str, float]:
        """Pair counts, ``skipped``, the source's own counts (CSV: rows, kept, empty_captions,
        non_string_captions, missing_image_paths; shards: samples, no_image, no_caption, bad_shards of the
        index pass) and ``pairs_per_s`` once an epoch has been measured (``DataStatsCallback``)."""
        out: dict[str, float] = {f"{name}_pairs": float(len(ds)) for name, ds in self.datasets.items()}
        out["skipped"] = float(self.skipped)
        train = self.datasets.get("train")
        if isinstance(train, ShardTrainSet):
            out["streamed_pairs"] = float(train.streamed)
        out.update({k: float(v) for k, v in self.source_stats.items() if isinstance(v, (int, float))})
        if self.pairs_per_s is not None:
            out["pairs_per_s"] = float(self.pairs_per_s)
        return out

    @property
    def train_rows(self) -> int:
        """Distinct training pairs (the range of their sample indices; a resampled epoch may have another
        length)."""
        train = self.datasets["train"]
        return train.rows if isinstance(train, ShardTrainSet) else len(train)

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _per_device(self, batch_size: int) -> int:
        world = self.world_size
        if batch_size % world:
            raise ValueError(f"data.batch_size={batch_size} is not divisible by the world size {world}")
        return batch_size // world

    def _next_pass(self) -> int:
        self._passes += 1
        return self._passes - 1

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        bs = self._per_device(self.batch_size)
        if len(ds) < bs:
            raise ValueError(f"training split has {len(ds)} pairs, fewer than one batch of {bs}")
        # drop_last: NC selection and OT assume full batches of the configured size.
        if isinstance(ds, ShardTrainSet):
            if self.trainer is not None:  # explicit: spawned workers do not see torch.distributed
                ds.pairs.rank, ds.pairs.world_size = self.trainer.global_rank, self.trainer.world_size
            # Fresh workers every pass (not persistent) so that each gets the new epoch's shard order.
            return ShardLoader(ds, self._next_pass, self.world_size, batch_size=bs, drop_last=True,
                               num_workers=self.num_workers)
        if self.world_size > 1:  # Lightning gives each process its part through a DistributedSampler
            return DataLoader(ds, batch_size=bs, shuffle=True, drop_last=True, num_workers=self.num_workers,
                              persistent_workers=self.num_workers > 0)
        # Shuffled as DataLoader(shuffle=True), and continued exactly by a checkpoint taken inside an epoch.
        return ResumableLoader(ds, batch_size=bs, drop_last=True, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0)

    def scoring_loader(self, seed: int = 0) -> DataLoader | None:
        """The training pairs in training-sized batches of a fixed random order, with the evaluation
        transform: a whole-split detection pass scores each pair among batch-mates as training does. None
        for a shard source (a full pass over web-scale shards is not taken implicitly)."""
        ds = self.datasets["train"]
        if not isinstance(ds, PairDataset):
            return None
        view = copy.copy(ds)
        view.transform = self.preprocess_val
        return DataLoader(view, batch_size=self.batch_size, shuffle=True, drop_last=False,
                          generator=torch.Generator().manual_seed(seed), num_workers=self.num_workers)

    def eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader("test")

    def category_labels(self, split: str) -> torch.Tensor:
        cats = self.datasets[split].frame["category"]
        names = self.zeroshot_classnames if split == "zeroshot" else self.classnames
        index = {c: i for i, c in enumerate(names)}
        return torch.tensor([index[c] for c in cats], dtype=torch.long)
