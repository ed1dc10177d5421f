"""Atomic file writes shared by checkpoints, metrics, noise artifacts and index caches."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it is renamed onto ``path``.

    Readers never see a half-written file (an interrupted write leaves the old one, and its temporary file is
    removed). The temporary name carries the process id because ranks and sweep jobs may write the same file
    at once, and it keeps the suffix for writers that append one (``np.save``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def discard_unused_output(folder: str | os.PathLike, levels: int = 3) -> None:
    """Remove a run folder that holds nothing but Hydra's record of the start (``.hydra/``, ``*.log``), then
    the parents left empty (up to ``levels``): a command refused at start leaves no folder behind."""
    import shutil

    folder = Path(folder)
    if not folder.is_dir() or any(p.name != ".hydra" and p.suffix != ".log" for p in folder.iterdir()):
        return
    shutil.rmtree(folder, ignore_errors=True)
    for parent in list(folder.parents)[:levels]:
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break
