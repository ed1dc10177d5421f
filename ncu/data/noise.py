"""Synthetic noisy correspondence: corruption protocols and persisted artifacts.

Protocols (see "Noise" in docs/data.md):
- ``caption`` (C): select floor(r*N) captions with the noise seed and shuffle their image ids among
  themselves. A selected caption may land on its own image, so the realised rate can be below r.
- ``image`` (I): select floor(r*M) images and permute them; all captions of an image move together.
- ``random_replace``: each selected caption is paired with an image drawn uniformly from the corpus.
- ``semantic`` (hard noise): captions are clustered (k-means on TF-IDF vectors); floor(r*N) captions are
  selected as in ``caption`` and their image ids are shuffled only among selected captions of the same
  cluster, so a wrong caption describes a similar scene. A cluster holding a single selected caption leaves it
  on its own image, so the realised rate can be noticeably below r when clusters are small.
- ``concept`` (partly related): floor(r*N) captions that name a concept of the data keep their image, and one
  concept they name is replaced by another the caption does not name ("cat, tent and bell" -> "cat, kite and
  bell"): the image still shows the rest, the most web-like mismatch. The concepts are the data's category
  names (scenes: its vocabulary); only captions naming one can be chosen. Stored as ``edits.npy``.
- ``none``: clean.
``derangement=True`` makes the caption/image shuffles fixed-point free, so exactly floor(r*N) pairs are wrong
(for ``semantic``: every selected caption in a cluster with at least two selected captions).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ncu.choices import NOISE_PROTOCOLS
from ncu.errors import ArtifactError
from ncu.files import atomic_path

PROTOCOLS = NOISE_PROTOCOLS
ARTIFACT_FILES = ("perm.npy", "noisy_mask.npy", "keys.npy")
# Protocols that edit the caption text instead of moving it to another image.
TEXT_PROTOCOLS = ("concept",)


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
    *,
    captions: list[str] | None = None,
    n_clusters: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt an image-caption pairing.

    Returns ``(perm, noisy_mask)``: ``perm[k]`` is the image index caption k is paired with after
    corruption, ``noisy_mask[k]`` is True where it differs from the original image ``k // captions_per_image``.
    ``captions`` (the N caption texts) is required by ``semantic``; ``n_clusters`` defaults to
    max(2, N // 50).
    """
    rate = check_rate(rate)
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown noise.protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if captions_per_image < 1 or num_captions % captions_per_image:
        raise ValueError(
            f"num_captions={num_captions} is not a multiple of captions_per_image={captions_per_image}"
        )
    if protocol in TEXT_PROTOCOLS:
        raise ValueError(f"noise.protocol {protocol!r} edits captions instead of moving them: use replace_concepts")
    if protocol == "semantic" and (captions is None or len(captions) != num_captions):
        got = "none" if captions is None else f"{len(captions)}"
        raise ValueError(
            f"noise.protocol 'semantic' needs the caption texts (captions=, one per caption; "
            f"expected {num_captions}, got {got})"
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
    elif protocol == "semantic":
        selected = rng.permutation(num_captions)[: math.floor(rate * num_captions)]
        labels = caption_clusters(captions, n_clusters, seed)
        # Group the selected captions by cluster, keeping selection order within a cluster (stable sort).
        order = np.argsort(labels[selected], kind="stable")
        grouped = selected[order]
        bounds = np.flatnonzero(np.diff(labels[grouped])) + 1
        for members in np.split(grouped, bounds):
            if len(members) < 2:
                continue
            perm[members] = t2i[_shuffle(members, rng, derangement)]
            if derangement and captions_per_image > 1:
                _fix_same_image(perm, t2i, members, rng)
    return perm, perm != t2i


def _concept_pattern(names: list[str]) -> re.Pattern:
    # Whole words, hyphenated ones included ("t-shirt" never reads as "shirt"), any case, longest name first.
    alternation = "|".join(re.escape(c) for c in sorted(names, key=lambda c: (-len(c), c)))
    return re.compile(r"(?<![\w-])(" + alternation + r")(?![\w-])", re.IGNORECASE)


def concept_mentions(captions: list[str], concepts: list[str]) -> list[list[str]]:
    """The concepts each caption names (as spelled in ``concepts``, each once, in order of first mention)."""
    canon = {}
    for c in concepts:
        name = str(c).strip()
        if name:
            canon.setdefault(name.lower(), name)
    if not canon:
        return [[] for _ in captions]
    pattern = _concept_pattern(list(canon.values()))
    return [list(dict.fromkeys(canon[m.group(1).lower()] for m in pattern.finditer(str(c)))) for c in captions]


def replace_concepts(captions: list[str], rate: float, seed: int, concepts: list[str],
                     mentions: list[list[str]] | None = None) -> np.ndarray:
    """Protocol ``concept``: the edited caption of each of floor(rate*N) captions, "" for the others.

    A caption is editable when it names at least one of ``concepts`` (``concept_mentions``: whole words, any
    case, the longest name first, so "cat face" is not read as "cat"); floor(rate*N) editable captions are drawn
    with ``seed`` (all of them if fewer), one concept each names is drawn and every mention of it replaced by a
    concept drawn from those the caption does not name. So an edited caption differs from its original in
    exactly one concept (a caption naming one concept only becomes wholly wrong). ``mentions``: the captions'
    ``concept_mentions`` when the caller has them already."""
    rate = check_rate(rate)
    names = list(dict.fromkeys(str(c).strip() for c in concepts if str(c).strip()))
    edits = np.full(len(captions), "", dtype=object)
    if not names or rate == 0.0:
        return edits
    mentions = concept_mentions(captions, names) if mentions is None else mentions
    pattern = _concept_pattern(names)  # all names, so "cat" is never read inside "cat face"
    editable = np.flatnonzero([bool(m) for m in mentions])
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(editable)[: math.floor(rate * len(captions))]
    for k in np.sort(chosen):
        named = mentions[k]
        old = named[int(rng.integers(len(named)))]
        taken = {c.lower() for c in named}
        others = [c for c in names if c.lower() not in taken]
        if not others:
            continue
        new = others[int(rng.integers(len(others)))]
        edits[k] = pattern.sub(lambda m: new if m.group(1).lower() == old.lower() else m.group(0), str(captions[k]))
    return edits


def caption_clusters(captions: list[str], n_clusters: int | None = None, seed: int = 0) -> np.ndarray:
    """Cluster id of every caption: k-means (n_init=3, random_state=seed) on TF-IDF vectors.

    Captions without any vocabulary word (empty, punctuation only) all fall in one cluster. Exact k-means
    costs O(N * k * vocabulary) per iteration: meant for Flickr30K/MSCOCO-sized sets (up to ~10^5 captions);
    at CC3M/CC12M scale pass a small ``n_clusters`` or cluster a subset.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.feature_extraction.text import TfidfVectorizer

    n = len(captions)
    k = max(2, n // 50) if n_clusters is None else int(n_clusters)
    if k < 1:
        raise ValueError(f"noise.n_clusters must be >= 1, got {n_clusters!r}")
    k = min(k, n)
    if n == 0 or k == 1:
        return np.zeros(n, dtype=np.int64)
    try:
        x = TfidfVectorizer().fit_transform([str(c) for c in captions])
    except ValueError:  # empty vocabulary: nothing to tell captions apart
        return np.zeros(n, dtype=np.int64)
    with warnings.catch_warnings():
        # Repeated captions can leave fewer distinct points than k; KMeans then returns fewer clusters.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(x).astype(np.int64)


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
    edits: np.ndarray | None = None  # (N,) edited caption text, "" where unchanged (text protocols)

    def captions(self, original: list[str] | np.ndarray) -> np.ndarray:
        """The training captions as corrupted: ``original`` with the edits applied."""
        out = np.asarray(original, dtype=object).copy()
        if self.edits is not None:
            edited = self.edits != ""
            out[edited] = self.edits[edited]
        return out

    @property
    def realised_rate(self) -> float:
        return float(self.noisy_mask.mean()) if len(self.noisy_mask) else 0.0

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        # Each file is written atomically and meta.json last: a folder with meta.json holds a whole artifact.
        # meta.json records each file's hash, so a file changed or replaced later is refused on reuse.
        hashes = {}
        files = [("perm.npy", self.perm), ("noisy_mask.npy", self.noisy_mask), ("keys.npy", self.keys.astype(str))]
        if self.edits is not None:
            files.append(("edits.npy", self.edits.astype(str)))
        for name, arr in files:
            with atomic_path(folder / name) as tmp:
                np.save(tmp, arr)
            hashes[name] = file_sha256(folder / name)
        self.meta = {**self.meta, "sha256": hashes}
        with atomic_path(folder / "meta.json") as tmp:
            tmp.write_text(json.dumps(self.meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "NoiseArtifact":
        """The artifact in ``folder``, checked: every file readable, equal to the hash meta.json recorded,
        and consistent (lengths N, ``noisy_mask == (perm != identity)``, the count and key fingerprint of
        meta.json). Anything else raises ``ArtifactError`` naming the folder and how to rebuild it."""
        folder = Path(folder)

        def bad(problem: str) -> ArtifactError:
            return ArtifactError(f"noise artifact {folder}: {problem}; delete the folder to rebuild it "
                                 f"(rm -r {folder})")

        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise bad(f"meta.json is unreadable ({type(e).__name__})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("N"), int):
            raise bad("meta.json has no N")
        arrays = {}
        edited = "edits.npy" in (meta.get("sha256") or {})
        for name in ARTIFACT_FILES + (("edits.npy",) if edited else ()):
            try:
                arrays[name] = np.load(folder / name, allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise bad(f"{name} is unreadable ({type(e).__name__}: {e})") from None
        for name, digest in (meta.get("sha256") or {}).items():
            if file_sha256(folder / name) != digest:
                raise bad(f"{name} differs from the file meta.json recorded (changed after it was written)")
        art = cls(keys=arrays["keys.npy"], perm=arrays["perm.npy"], noisy_mask=arrays["noisy_mask.npy"], meta=meta,
                  edits=arrays["edits.npy"].astype(object) if edited else None)
        problem = art.inconsistency()
        if problem:
            raise bad(problem)
        return art

    def inconsistency(self) -> str | None:
        """What contradicts the artifact's own record, or None."""
        n = self.meta["N"]
        arrays = [("perm", self.perm), ("noisy_mask", self.noisy_mask), ("keys", self.keys)]
        for name, arr in arrays + ([("edits", self.edits)] if self.edits is not None else []):
            if arr.ndim != 1 or len(arr) != n:
                return f"{name}.npy has shape {arr.shape}, meta.json says N={n}"
        if not np.issubdtype(self.perm.dtype, np.integer) or (n and (self.perm.min() < 0 or self.perm.max() >= n)):
            return f"perm.npy is not a list of image indices in [0, {n})"
        wrong = self.perm != np.arange(n)
        if self.edits is not None:
            wrong = wrong | (self.edits != "")
        if self.noisy_mask.dtype != bool or not np.array_equal(self.noisy_mask, wrong):
            return "noisy_mask.npy does not mark the captions that perm.npy moves or edits.npy edits"
        if int(self.noisy_mask.sum()) != self.meta.get("num_noisy", int(self.noisy_mask.sum())):
            return f"{int(self.noisy_mask.sum())} noisy captions, meta.json says {self.meta.get('num_noisy')}"
        if fingerprint(self.keys) != self.meta.get("fingerprint"):
            return "keys.npy does not match the fingerprint in meta.json"
        return None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def artifact_dir(root: str | os.PathLike, dataset: str, protocol: str, rate: float, seed: int,
                 derangement: bool = False, n_clusters: int | None = None) -> Path:
    name = f"{protocol}_r{rate:g}_s{seed}" + ("_derange" if derangement else "")
    if protocol == "semantic" and n_clusters is not None:
        name += f"_k{n_clusters}"
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
    *,
    n_clusters: int | None = None,
    concepts: list[str] | None = None,
) -> tuple[NoiseArtifact, Path, bool]:
    """Reuse the artifact for (dataset, protocol, rate, seed) if present, else create and save it.

    Returns ``(artifact, folder, reused)``. A stored artifact whose dataset fingerprint differs is refused.
    ``semantic`` clusters ``captions`` (required) into ``n_clusters`` (part of the artifact name when given);
    ``concept`` edits ``captions`` (required) with the names in ``concepts``.
    """
    keys = np.asarray([str(k) for k in keys])
    fp = fingerprint(keys)
    folder = artifact_dir(root, dataset, protocol, check_rate(rate), seed, derangement, n_clusters)
    if (folder / "meta.json").exists():
        art = NoiseArtifact.load(folder)
        if art.meta.get("fingerprint") != fp:
            raise ArtifactError(
                f"noise artifact {folder} was made for another dataset (fingerprint "
                f"{art.meta.get('fingerprint')} != {fp}, N={art.meta.get('N')} vs {len(keys)}); "
                "delete it or point paths.noise_dir elsewhere"
            )
        return art, folder, True
    edits = None
    if protocol in TEXT_PROTOCOLS:
        if captions is None or len(captions) != len(keys):
            raise ValueError(f"noise.protocol {protocol!r} needs the caption texts (captions=, one per key)")
        if derangement:
            raise ValueError(f"noise.protocol {protocol!r} keeps captions with their images: derangement does not apply")
        mentions = concept_mentions(list(captions), concepts or [])  # one scan: the edits and the editable count
        edits = replace_concepts(list(captions), rate, seed, concepts or [], mentions)
        perm, noisy = np.arange(len(keys), dtype=np.int64), edits != ""
    else:
        perm, noisy = make_noise(len(keys), rate, protocol, seed, derangement=derangement,
                                 captions=captions if protocol == "semantic" else None, n_clusters=n_clusters)
    text_rate = None
    if captions is not None:
        # Web data repeats captions: the caption text of a corrupted pair may be identical to the true one
        # (the caption shown against the true caption of the image it is shown with).
        captions = np.asarray(captions, dtype=object)
        shown = captions if edits is None else NoiseArtifact(keys, perm, noisy, {}, edits).captions(captions)
        text_rate = float(np.mean(shown != captions[perm])) if len(keys) else 0.0
    meta = {
        "dataset": dataset, "protocol": protocol, "rate": rate, "seed": seed, "derangement": derangement,
        "N": len(keys), "fingerprint": fp, "realised_rate": float(noisy.mean()) if len(keys) else 0.0,
        "realised_text_rate": text_rate, "num_noisy": int(noisy.sum()),
    }
    if protocol == "semantic":
        meta["n_clusters"] = n_clusters
    if protocol in TEXT_PROTOCOLS:  # how many captions could be edited at all: the realised rate's ceiling
        meta["editable"] = int(sum(bool(m) for m in mentions))
        meta["concepts"] = len(set(concepts or []))
    art = NoiseArtifact(keys=keys, perm=perm, noisy_mask=noisy, meta=meta, edits=edits)
    art.save(folder)
    return art, folder, False
