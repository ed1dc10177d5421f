"""Synthetic noisy correspondence: corruption protocols and persisted artifacts.

Protocols (see the README's "Noise" section):
- ``caption`` (C): select floor(r*N) captions with the noise seed and shuffle their image ids among
  themselves. A selected caption may land on its own image, so the realised rate can be below r.
- ``image`` (I): select floor(r*M) images and permute them; all captions of an image move together.
- ``random_replace``: each selected caption is paired with an image drawn uniformly from the corpus.
- ``none``: clean.
``derangement=True`` makes the caption/image shuffles fixed-point free, so exactly floor(r*N) pairs are wrong.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROTOCOLS = ("none", "caption", "image", "random_replace")


def check_rate(rate: float) -> float:
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not (0.0 <= float(rate) < 1.0):
        raise ValueError(f"noise.rate must be a number in [0, 1), got {rate!r}")
    return float(rate)


def _shuffle(idx: np.ndarray, rng: np.random.Generator, derangement: bool) -> np.ndarray:
    """A permutation of ``idx``; with ``derangement`` no element stays in place (Sattolo's cycle)."""
    out = idx.copy()
    if not derangement:
        return out[rng.permutation(len(out))]
    # Sattolo's algorithm draws a uniformly random single cycle: no fixed points.
    for i in range(len(out) - 1, 0, -1):
        j = int(rng.integers(0, i))
        out[i], out[j] = out[j], out[i]
    return out


def make_noise(
    num_captions: int,
    rate: float,
    protocol: str = "caption",
    seed: int = 0,
    captions_per_image: int = 1,
    derangement: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt an image-caption pairing.

    Returns ``(perm, noisy_mask)``: ``perm[k]`` is the image index caption k is paired with after
    corruption, ``noisy_mask[k]`` is True where it differs from the original image ``k // captions_per_image``.
    """
    rate = check_rate(rate)
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown noise.protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if captions_per_image < 1 or num_captions % captions_per_image:
        raise ValueError(
            f"num_captions={num_captions} is not a multiple of captions_per_image={captions_per_image}"
        )
    t2i = np.arange(num_captions, dtype=np.int64) // captions_per_image
    num_images = num_captions // captions_per_image
    rng = np.random.default_rng(seed)
    perm = t2i.copy()
    if protocol == "none" or rate == 0.0:
        return perm, np.zeros(num_captions, dtype=bool)
    if protocol == "caption":
        selected = rng.permutation(num_captions)[: math.floor(rate * num_captions)]
        if len(selected) >= 2:
            perm[selected] = t2i[_shuffle(selected, rng, derangement)]
            if derangement and captions_per_image > 1:
                # A caption may share its image with another selected caption (several captions per
                # image); move such collisions so that every selected caption is wrong.
                _fix_same_image(perm, t2i, selected, rng)
    elif protocol == "image":
        selected = rng.permutation(num_images)[: math.floor(rate * num_images)]
        if len(selected) >= 2:
            image_perm = np.arange(num_images, dtype=np.int64)
            image_perm[selected] = _shuffle(selected, rng, derangement)
            perm = image_perm[t2i]
    elif protocol == "random_replace":
        selected = rng.permutation(num_captions)[: math.floor(rate * num_captions)]
        draws = rng.integers(0, num_images, size=len(selected))
        if derangement and num_images > 1:
            # Redraw from the other images only: shift by 1..M-1.
            shift = rng.integers(1, num_images, size=len(selected))
            draws = (t2i[selected] + shift) % num_images
        perm[selected] = draws
    return perm, perm != t2i


def _fix_same_image(perm: np.ndarray, t2i: np.ndarray, selected: np.ndarray, rng: np.random.Generator) -> None:
    bad = selected[perm[selected] == t2i[selected]]
    for k in bad:
        # Swap targets with another selected caption whose image differs from both.
        for j in rng.permutation(selected):
            if perm[j] != t2i[k] and perm[k] != t2i[j]:
                perm[k], perm[j] = perm[j], perm[k]
                break


def fingerprint(keys: list[str] | np.ndarray) -> str:
    """A hash of the ordered sample keys: identifies the dataset an artifact belongs to."""
    h = hashlib.sha256()
    for k in keys:
        h.update(str(k).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@dataclass
class NoiseArtifact:
    """Corruption of one dataset, keyed on stable sample keys (never on loader order)."""

    keys: np.ndarray  # (N,) caption keys
    perm: np.ndarray  # (N,) image index paired with caption k
    noisy_mask: np.ndarray  # (N,) bool
    meta: dict

    @property
    def realised_rate(self) -> float:
        return float(self.noisy_mask.mean()) if len(self.noisy_mask) else 0.0

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # Write to temporary names then rename: an interrupted save never leaves a half artifact.
        for name, arr in (("perm.npy", self.perm), ("noisy_mask.npy", self.noisy_mask),
                          ("keys.npy", self.keys.astype(str))):
            tmp = folder / f".{name}.tmp.npy"
            np.save(tmp, arr)
            os.replace(tmp, folder / name)
        tmp = folder / ".meta.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=2))
        os.replace(tmp, folder / "meta.json")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "NoiseArtifact":
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        return cls(
            keys=np.load(folder / "keys.npy"),
            perm=np.load(folder / "perm.npy"),
            noisy_mask=np.load(folder / "noisy_mask.npy"),
            meta=meta,
        )


def artifact_dir(root: str | os.PathLike, dataset: str, protocol: str, rate: float, seed: int,
                 derangement: bool = False) -> Path:
    name = f"{protocol}_r{rate:g}_s{seed}" + ("_derange" if derangement else "")
    return Path(root) / dataset / name


def build_or_load(
    root: str | os.PathLike,
    dataset: str,
    keys: list[str] | np.ndarray,
    captions: list[str] | None,
    rate: float,
    protocol: str = "caption",
    seed: int = 0,
    derangement: bool = False,
) -> tuple[NoiseArtifact, Path, bool]:
    """Reuse the artifact for (dataset, protocol, rate, seed) if present, else create and save it.

    Returns ``(artifact, folder, reused)``. A stored artifact whose dataset fingerprint differs is refused.
    """
    keys = np.asarray([str(k) for k in keys])
    fp = fingerprint(keys)
    folder = artifact_dir(root, dataset, protocol, check_rate(rate), seed, derangement)
    if (folder / "meta.json").exists():
        art = NoiseArtifact.load(folder)
        if art.meta.get("fingerprint") != fp:
            raise ValueError(
                f"noise artifact {folder} was made for another dataset (fingerprint "
                f"{art.meta.get('fingerprint')} != {fp}, N={art.meta.get('N')} vs {len(keys)}); "
                "delete it or point paths.noise_dir elsewhere"
            )
        return art, folder, True
    perm, noisy = make_noise(len(keys), rate, protocol, seed, derangement=derangement)
    text_rate = None
    if captions is not None:
        # Web data repeats captions: the caption text of a corrupted pair may be identical to the true one.
        captions = np.asarray(captions, dtype=object)
        text_rate = float(np.mean(captions[perm] != captions)) if len(keys) else 0.0
    meta = {
        "dataset": dataset, "protocol": protocol, "rate": rate, "seed": seed, "derangement": derangement,
        "N": len(keys), "fingerprint": fp, "realised_rate": float(noisy.mean()) if len(keys) else 0.0,
        "realised_text_rate": text_rate, "num_noisy": int(noisy.sum()),
    }
    art = NoiseArtifact(keys=keys, perm=perm, noisy_mask=noisy, meta=meta)
    art.save(folder)
    return art, folder, False
