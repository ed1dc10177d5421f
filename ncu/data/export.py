"""Write the embedded real pairs as a CSV with image files and as WebDataset tar shards.

    python -m ncu.data.export data/export --limit 2000 --shards 8            # both formats
    python -m ncu.data.export data/export --limit 200 --corrupt 3 --bench    # + loader throughput

Layout of ``<out>``:
- ``pairs.csv``: columns image_path (relative to the CSV), caption, category, key; images in ``images/``;
- ``shards/{00000..000NN}.tar``: per sample ``{key}.png``, ``{key}.txt`` (caption) and ``{key}.json``
  (caption, category, the original key).

Keys are the embedded keys made safe for tar member names (``twemoji:1f600`` -> ``twemoji_1f600``): the
WebDataset key ends at the first dot and a ``/`` would make a folder. Both formats hold the same samples in
the same order. ``--corrupt N`` adds N unreadable images (alternately a truncated PNG and text saved as
``.png``, keys ``corrupt_000``...) spread through the samples, to exercise robust loading. The output is
deterministic: same arguments, same bytes.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from ncu.data.embedded import embedded_pairs, unit_hash

CORRUPT_KINDS = ("truncated", "text")


@dataclass
class Sample:
    key: str  # safe key (tar member stem, image file stem)
    source_key: str
    caption: str
    category: str
    data: bytes  # encoded PNG (or the corrupt bytes)


def safe_key(key: str) -> str:
    """A key usable as a tar member stem and a file name: anything but letters, digits, ``-`` and ``_``
    becomes ``_`` (``:``, ``/`` and ``.`` in particular)."""
    return re.sub(r"[^0-9A-Za-z_-]", "_", key)


def _unique(keys: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        n = seen.get(k, 0)
        seen[k] = n + 1
        out.append(k if n == 0 else f"{k}_{n + 1}")
    if len(set(out)) != len(out):
        raise ValueError("could not make the sample keys unique")
    return out


def select_pairs(pairs: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """The first ``limit`` pairs in key-hash order (a mix of sources and categories), sorted by key."""
    if limit is not None and limit < len(pairs):
        order = np.argsort(pairs["key"].map(lambda k: unit_hash(k, "export")).to_numpy(), kind="stable")
        pairs = pairs.iloc[order[:limit]]
    return pairs.sort_values("key", ignore_index=True)


def corrupt_bytes(kind: str, valid_png: bytes) -> bytes:
    if kind == "truncated":
        return valid_png[: max(16, len(valid_png) * 2 // 5)]  # header intact, image data cut
    return b"this is text, not an image\n"


def collect_samples(pairs: pd.DataFrame, corrupt: int = 0) -> list[Sample]:
    """Samples of the pairs (image bytes read from disk) with ``corrupt`` unreadable ones spread evenly
    among them; corrupt sample i copies the category of the pair its bytes were cut from."""
    keys = _unique([safe_key(k) for k in pairs["key"]])
    samples = [Sample(k, sk, cap, cat, Path(img).read_bytes())
               for k, sk, cap, cat, img in zip(keys, pairs["key"], pairs["caption"], pairs["category"],
                                               pairs["image"])]
    real, n = list(samples), len(samples)
    if corrupt and not n:
        raise ValueError("corrupt samples need at least one real pair to copy from")
    for i in reversed(range(corrupt)):  # back to front so earlier insertion points stay valid
        source = real[i % n]
        kind = CORRUPT_KINDS[i % len(CORRUPT_KINDS)]
        bad = Sample(f"corrupt_{i:03d}", f"corrupt:{i}", f"corrupt file {i} ({kind})", source.category,
                     corrupt_bytes(kind, source.data))
        samples.insert((i + 1) * n // (corrupt + 1), bad)
    return samples


def write_csv(samples: Sequence[Sample], out: Path) -> Path:
    images = out / "images"
    if images.exists():
        shutil.rmtree(images)
    images.mkdir(parents=True)
    rows = []
    for s in samples:
        (images / f"{s.key}.png").write_bytes(s.data)
        rows.append((f"images/{s.key}.png", s.caption, s.category, s.key))
    path = out / "pairs.csv"
    pd.DataFrame(rows, columns=["image_path", "caption", "category", "key"]).to_csv(path, index=False)
    return path


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: byte-identical reruns
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def write_shards(samples: Sequence[Sample], out: Path, num_shards: int) -> tuple[list[Path], str]:
    """Contiguous runs of samples in ``num_shards`` tars; returns the paths and their brace spec."""
    if num_shards < 1:
        raise ValueError(f"--shards must be >= 1, got {num_shards}")
    folder = out / "shards"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    paths = []
    for i, chunk in enumerate(np.array_split(np.arange(len(samples)), num_shards)):
        path = folder / f"{i:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for j in chunk:
                s = samples[j]
                meta = {"caption": s.caption, "category": s.category, "key": s.source_key}
                _add(tf, f"{s.key}.png", s.data)
                _add(tf, f"{s.key}.txt", s.caption.encode("utf-8"))
                _add(tf, f"{s.key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
        # img2dataset's companion table: one row per sample with its key, caption and download status.
        pd.DataFrame({"key": [samples[j].key for j in chunk], "caption": [samples[j].caption for j in chunk],
                      "status": "success"}).to_parquet(path.with_suffix(".parquet"), index=False)
        paths.append(path)
    spec = str(folder / f"{{{0:05d}..{num_shards - 1:05d}}}.tar")
    return paths, spec


def export(out: str | Path, limit: int | None = None, num_shards: int = 4, fmt: str = "both",
           corrupt: int = 0, skin_tones: bool = False) -> dict[str, Any]:
    """Write the embedded pairs to ``out``. Returns ``{"samples", "corrupt_keys", "csv", "shards", "spec"}``
    (paths absent for a format not written)."""
    if fmt not in ("csv", "wds", "both"):
        raise ValueError(f"--format must be csv, wds or both, got {fmt!r}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    samples = collect_samples(select_pairs(embedded_pairs(skin_tones=skin_tones), limit), corrupt)
    result: dict[str, Any] = {"samples": len(samples),
                              "corrupt_keys": [s.key for s in samples if s.key.startswith("corrupt_")]}
    if fmt in ("csv", "both"):
        result["csv"] = write_csv(samples, out)
    if fmt in ("wds", "both"):
        result["shards"], result["spec"] = write_shards(samples, out, num_shards)
    return result


def stdlib_tar_samples(shard: str, read_images: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The shard reader before the webdataset library (standard-library ``tarfile``, local files only), kept
    as the baseline the loader benchmark compares the library's reading with."""
    import tarfile

    from ncu.data.wds import IMAGE_EXTS

    with tarfile.open(shard, "r|*") as tf:
        key, parts = None, {}
        for member in tf:
            folder, _, base = member.name.rpartition("/")
            dot = base.find(".")
            if not member.isfile() or dot <= 0:
                continue
            k, ext = (f"{folder}/{base[:dot]}" if folder else base[:dot]), base[dot + 1:].lower()
            if k != key:
                if key is not None:
                    yield key, parts
                key, parts = k, {}
            if ext in IMAGE_EXTS or ext in ("txt", "json"):
                parts[ext] = tf.extractfile(member).read() if read_images or ext not in IMAGE_EXTS else b""
        if key is not None:
            yield key, parts


def bench(result: dict[str, Any], out: Path, batch_size: int = 64, n_batches: int = 20, num_workers: int = 0,
          model: str = "tiny", repeats: int = 5) -> dict[str, dict[str, float]]:
    """Loader throughput (``loader_throughput``) of the exported CSV and shards, each read with its data
    config (conf/data/csv.yaml, conf/data/wds.yaml), the model config's transforms and image-protocol noise;
    the shards also through the standard-library reader they had before webdataset (``wds_stdlib``). The
    sources take turns ``repeats`` times (so that machine noise hits them alike); medians are reported."""
    import contextlib
    import statistics
    from unittest import mock

    from omegaconf import OmegaConf

    from ncu.config import compose_config
    from ncu.data.datamodule import PairDataModule
    from ncu.data.stats import loader_throughput
    from ncu.models import factory

    sources = {"csv": [f"data.path={result['csv']}", "data.category_key=category", "data.key_key=key"]
               if "csv" in result else None,
               "wds": [f'data.shards="{result["spec"]}"'] if "spec" in result else None}
    if sources["wds"] is not None:
        sources["wds_stdlib"] = sources["wds"]

    def reader(name: str) -> Any:
        return (mock.patch("ncu.data.wds.iter_samples", stdlib_tar_samples) if name == "wds_stdlib"
                else contextlib.nullcontext())

    modules, setup = {}, {}
    for name, overrides in sources.items():
        if overrides is None:
            continue
        cfg = compose_config([f"data={name.split('_')[0]}", f"model={model}", *overrides,
                              f"data.batch_size={batch_size}", f"data.num_workers={num_workers}"])
        bundle = factory.create(cfg.model.name, None, aug_cfg=OmegaConf.to_container(cfg.model.get("aug") or {}))
        data = OmegaConf.to_container(cfg.data, resolve=True)
        dm = PairDataModule(data, {"protocol": "image", "rate": 0.4, "seed": 0}, batch_size=batch_size,
                            num_workers=num_workers, noise_dir=str(out / "noise"))
        dm.attach(bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer)
        t0 = time.perf_counter()
        with reader(name):
            dm.setup()
        setup[name], modules[name] = time.perf_counter() - t0, dm
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in modules}
    for _ in range(repeats):
        for name, dm in modules.items():
            with reader(name):
                runs[name].append(loader_throughput(dm, n_batches))
    return {name: {"pairs_per_s": statistics.median(r["pairs_per_s"] for r in rs), "pairs": rs[0]["pairs"],
                   "seconds": statistics.median(r["seconds"] for r in rs), "setup_seconds": setup[name],
                   "skipped": float(modules[name].skipped), "repeats": float(len(rs))}
            for name, rs in runs.items()}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ncu.data.export", description=__doc__.splitlines()[0])
    p.add_argument("out", help="output folder")
    p.add_argument("--limit", type=int, default=None, help="keep N pairs (by key hash); default all")
    p.add_argument("--shards", type=int, default=4, help="number of tar shards (default 4)")
    p.add_argument("--format", choices=("csv", "wds", "both"), default="both")
    p.add_argument("--corrupt", type=int, default=0, help="add N unreadable images")
    p.add_argument("--skin-tones", action="store_true", help="include the emoji skin-tone variants")
    p.add_argument("--bench", action="store_true", help="then measure the loader throughput of each format")
    p.add_argument("--batch-size", type=int, default=64, help="--bench: batch size")
    p.add_argument("--batches", type=int, default=20, help="--bench: batches to time")
    p.add_argument("--num-workers", type=int, default=0, help="--bench: loader workers")
    p.add_argument("--model", default="tiny", help="--bench: model config whose transforms are used")
    p.add_argument("--repeats", type=int, default=5, help="--bench: rounds, the sources taking turns (medians)")
    args = p.parse_args(argv)
    result = export(args.out, args.limit, args.shards, args.format, args.corrupt, args.skin_tones)
    print(f"{result['samples']} samples ({len(result['corrupt_keys'])} corrupt)")
    if "csv" in result:
        print(f"csv:    {result['csv']}")
        print(f"  python train.py data=csv data.path={result['csv']} data.category_key=category data.key_key=key")
    if "spec" in result:
        print(f"shards: {result['spec']}")
        print(f"  python train.py data=wds 'data.shards=\"{result['spec']}\"'")
    if args.bench:
        for name, r in bench(result, Path(args.out).resolve(), args.batch_size, args.batches,
                             args.num_workers, args.model, args.repeats).items():
            print(f"bench {name}: {r['pairs_per_s']:.1f} pairs/s, median of {int(r['repeats'])} ({int(r['pairs'])} "
                  f"pairs in {r['seconds']:.2f} s, "
                  f"batch {args.batch_size}, {args.num_workers} workers); setup {r['setup_seconds']:.2f} s, "
                  f"skipped {int(r['skipped'])}")


if __name__ == "__main__":
    main()
