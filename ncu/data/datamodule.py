"""Image-caption pairs as a LightningDataModule: deterministic split, noisy training split, clean val/test."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ncu.data import noise as noise_lib
from ncu.data.embedded import embedded_pairs, split_of, unit_hash

log = logging.getLogger(__name__)


def load_image(path: str, max_side: int | None = None) -> Image.Image:
    """RGB image; transparent pixels are composited on white (emoji and stamps are drawn on alpha)."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
    if max_side and max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.BICUBIC)
    return im


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
        if frame["category"].isna().all():
            frame["category"] = "none"
        return frame
    raise ValueError(f"unknown data.source {source!r}; choose embedded or csv")


class PairDataset(Dataset):
    """Pairs (image[image_index[k]], caption[k]) with images decoded once and kept in memory.

    ``image_index`` realises the noise: caption k is shown with image ``image_index[k]``.
    Unreadable image files are skipped (their pairs dropped) and counted in ``skipped``.
    """

    def __init__(self, frame: pd.DataFrame, transform: Callable | None = None, tokenizer: Callable | None = None,
                 image_index: np.ndarray | None = None, noisy: np.ndarray | None = None,
                 max_side: int | None = 128):
        self.transform, self.tokenizer = transform, tokenizer
        n = len(frame)
        image_index = np.arange(n) if image_index is None else np.asarray(image_index)
        noisy = np.zeros(n, dtype=bool) if noisy is None else np.asarray(noisy, dtype=bool)
        images: list[Image.Image | None] = []
        for path in frame["image"]:
            try:
                images.append(load_image(path, max_side))
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
        self.num_workers, self.noise_dir = num_workers, noise_dir
        self.preprocess_train = self.preprocess_val = self.tokenizer = None
        self.datasets: dict[str, PairDataset] = {}
        self.noise_artifact: noise_lib.NoiseArtifact | None = None
        self.noise_folder: Path | None = None

    def attach(self, preprocess_train: Callable, preprocess_val: Callable, tokenizer: Callable) -> None:
        """Use the model's own preprocessing and tokenizer so they always match the architecture."""
        self.preprocess_train, self.preprocess_val, self.tokenizer = preprocess_train, preprocess_val, tokenizer
        for name, ds in self.datasets.items():
            ds.transform = preprocess_train if name == "train" else preprocess_val
            ds.tokenizer = tokenizer

    @property
    def name(self) -> str:
        return self.data_cfg.get("name", "embedded")

    # Loader settings do not change which pairs exist; everything else in the data config may.
    _LOADER_KEYS = ("batch_size", "eval_batch_size", "num_workers", "max_side")

    def dataset_id(self, frame: pd.DataFrame) -> str:
        """Name of the noise-artifact folder: the data name plus a hash of what defines the pairs
        (e.g. sources, skin tones, limit) and of which sources are present (TuxPaint is optional)."""
        spec = {k: v for k, v in sorted(self.data_cfg.items()) if k not in self._LOADER_KEYS}
        spec["present"] = sorted({str(k).split(":")[0] for k in frame["key"]})
        return f"{self.name}-{hashlib.sha1(json.dumps(spec, default=str).encode()).hexdigest()[:8]}"

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        frame = load_frame(self.data_cfg)
        val_frac, test_frac = self.data_cfg.get("val_frac", 0.1), self.data_cfg.get("test_frac", 0.2)
        split = frame["group"].map(lambda g: split_of(g, val_frac, test_frac))
        limit = self.data_cfg.get("limit")
        max_side = self.data_cfg.get("max_side", 128)
        for name in ("train", "val", "test"):
            part = frame[split == name].reset_index(drop=True)
            if limit:
                # Subsample by a hash of the key (for smoke runs): deterministic, independent of file order.
                n = max(1, int(limit * {"train": 1.0, "val": val_frac, "test": test_frac}[name]))
                order = np.argsort(part["key"].map(lambda k: unit_hash(k, "limit")).to_numpy(), kind="stable")
                part = part.iloc[order[:n]].reset_index(drop=True)
            if name == "train":
                self.noise_artifact, self.noise_folder, reused = noise_lib.build_or_load(
                    self.noise_dir, self.dataset_id(frame), part["key"].tolist(),
                    part["caption"].tolist(), self.noise_cfg.get("rate", 0.0),
                    self.noise_cfg.get("protocol", "caption"), self.noise_cfg.get("seed", 0),
                    self.noise_cfg.get("derangement", False))
                log.info("noise artifact %s (%s): realised rate %.4f", self.noise_folder,
                         "reused" if reused else "created", self.noise_artifact.realised_rate)
                ds = PairDataset(part, self.preprocess_train, self.tokenizer, self.noise_artifact.perm,
                                 self.noise_artifact.noisy_mask, max_side)
            else:
                ds = PairDataset(part, self.preprocess_val, self.tokenizer, max_side=max_side)
            self.datasets[name] = ds
        self.classnames = sorted(frame["category"].unique().tolist())

    @property
    def skipped(self) -> int:
        return sum(ds.skipped for ds in self.datasets.values())

    def _per_device(self, batch_size: int) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        if batch_size % world:
            raise ValueError(f"data.batch_size={batch_size} is not divisible by the world size {world}")
        return batch_size // world

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        bs = self._per_device(self.batch_size)
        if len(ds) < bs:
            raise ValueError(f"training split has {len(ds)} pairs, fewer than one batch of {bs}")
        # drop_last: NC selection and OT assume full batches of the configured size.
        return DataLoader(ds, batch_size=bs, shuffle=True, drop_last=True, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader("test")

    def category_labels(self, split: str) -> torch.Tensor:
        cats = self.datasets[split].frame["category"]
        index = {c: i for i, c in enumerate(self.classnames)}
        return torch.tensor([index[c] for c in cats], dtype=torch.long)

