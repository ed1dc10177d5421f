"""Atomic file writes shared by checkpoints, metrics, noise artifacts and index caches; what a failed write
says."""
from __future__ import annotations

import errno
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ncu.errors import StorageError

# The run folder's lock (ncu.cli.RunFolderLock): part of a run folder's start record, like .hydra/.
LOCK_FILE = ".run.lock"
# The write failures that are about the disk or folder, not the program: reported in one line.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# What torch.save's zip writer raises (a RuntimeError) when the disk fills under it.
TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def free_space(path: str | os.PathLike) -> str:
    """Free space on the disk holding ``path`` (its nearest existing parent), e.g. ``"1.2 GB"``."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown"
    return f"{free / 1e9:.1f} GB" if free >= 1e8 else f"{free / 1e6:.0f} MB"


def storage_error(err: BaseException, path: str | os.PathLike | None = None) -> StorageError | None:
    """``err`` as one line naming the path and its disk's free space when it is a disk or folder failure
    (full, read-only, forbidden); None for any other error."""
    if isinstance(err, StorageError):
        return err
    if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
        path = err.filename or path
        reason = os.strerror(err.errno)
    elif isinstance(err, RuntimeError) and path is not None and any(m in str(err) for m in TORCH_WRITE_FAILURES):
        reason = "the write failed (disk full?)"
    else:
        return None
    return StorageError(f"cannot write {path or 'a file'}: {reason} ({free_space(path or '.')} free on that disk)")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it is renamed onto ``path``.

    Readers never see a half-written file (an interrupted write leaves the old one, and its temporary file is
    removed). The temporary name carries the process id because ranks and sweep jobs may write the same file
    at once, and it keeps the suffix for writers that append one (``np.save``)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (storage_error(e, path.parent) or e) from None
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        failed = storage_error(e, path)
        if failed is None:
            raise
        raise failed from None
    finally:
        tmp.unlink(missing_ok=True)


def temporary_prefix(name: str) -> str:
    """Prefix of a temporary file or folder for ``name`` that says which host and process made it, so that
    :func:`remove_stale_temporaries` can tell a killed writer's leftovers from a live writer's work."""
    return f".{name}.{socket.gethostname()}.{os.getpid()}."


def remove_stale_temporaries(parent: str | os.PathLike, name: str) -> list[Path]:
    """Remove the temporaries of ``name`` in ``parent`` left by processes of this host that no longer run (a
    kill during a generation); those of live processes and of other hosts (a shared disk) stay."""
    removed = []
    host = socket.gethostname()
    for path in Path(parent).glob(f".{name}.{host}.*.*"):
        pid = path.name[len(f".{name}.{host}."):].split(".", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def discard_unused_output(folder: str | os.PathLike, levels: int = 3) -> None:
    """Remove a run folder that holds nothing but Hydra's record of the start (``.hydra/``, ``*.log``, the run
    folder lock of ``ncu.cli``), then the parents left empty (up to ``levels``): a command refused at start
    leaves no folder behind."""

    folder = Path(folder)
    if not folder.is_dir() or any(p.name not in (".hydra", LOCK_FILE) and p.suffix != ".log"
                                  for p in folder.iterdir()):
        return
    shutil.rmtree(folder, ignore_errors=True)
    for parent in list(folder.parents)[:levels]:
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break
