"""What the entry points do when a command fails on bad input, and a sweep's exit status.

:class:`RunFolderLock` holds an exclusive lock on a run's folder while it runs: a second command started in
the same folder exits 2 naming the first, before Hydra writes anything there.

A refused run prints one ``error:`` line. Alone, it exits 2 and leaves no folder behind. Inside a multirun it
fails that point only: the message goes to ``<job dir>/error.txt`` (where ``ncu.report`` finds it), Hydra goes
on with the other points, and :class:`SweepExitCode` makes the sweep exit 2 at its end, naming the failed ones.
Light imports only (no torch): the entry points call this before the heavy modules load.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from ncu.files import LOCK_FILE, atomic_path, discard_unused_output

ERROR_FILE = "error.txt"


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def refuse(output_dir: str | Path, err: BaseException, keep_output: bool = False) -> None:
    """Print ``error: <err>``; in a multirun record it in the job folder and return (the sweep goes on),
    otherwise remove the unused run folder (unless ``keep_output``) and exit 2."""
    print(f"error: {err}", file=sys.stderr)
    if in_multirun():
        with atomic_path(Path(output_dir) / ERROR_FILE) as tmp:
            tmp.write_text(f"{err}\n")
        return
    if not keep_output:
        discard_unused_output(output_dir)
    sys.exit(2)


def failed_points(sweep_dir: str | Path) -> list[tuple[Path, str]]:
    """``(job dir, message)`` of the points of a sweep that were refused (their ``error.txt``)."""
    root = Path(sweep_dir)
    found = sorted(root.rglob(ERROR_FILE)) if root.is_dir() else []
    return [(path.parent, path.read_text().strip()) for path in found]


class SweepExitCode(Callback):
    """At the end of a multirun: name the refused points and exit 2 when there is one, so a script or a
    scheduler running the sweep sees that it did not all run."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = failed_points(config.hydra.sweep.dir)
        if not failed:
            return
        lines = "\n".join(f"  {job.name}: {message}" for job, message in failed)
        print(f"error: {len(failed)} point(s) of the sweep {config.hydra.sweep.dir} failed (the others ran):\n"
              f"{lines}", file=sys.stderr)
        sys.exit(2)


def process_rank() -> int:
    """This process's global rank as launchers set it (torchrun, SLURM, Lightning's DDP children); 0 alone."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def lock_run_folder(run_dir: str | Path) -> int:
    """Take the exclusive lock of ``run_dir`` (``.run.lock``, released by the OS when the process ends) and
    record who holds it; ``ConfigError`` naming the holder when another process has it."""
    from ncu.errors import ConfigError

    path = Path(run_dir).absolute() / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            holder = json.loads(path.read_text())
            who = (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: "
                   f"{' '.join(holder['argv'])}")
        except (OSError, ValueError, KeyError):
            who = "another process"
        raise ConfigError(f"{path.parent} is in use by another run ({who}); wait for it to end or choose "
                          "another hydra.run.dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}).encode())
    return fd


class RunFolderLock(Callback):
    """One run per folder: ``train.py`` takes its run folder's lock before Hydra writes its record there (a
    single run) or when a sweep's job starts (each job its own folder); only rank 0 of a multi-process run."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def _lock(self, run_dir: str) -> None:
        if process_rank() != 0:
            return
        try:
            self.fd = lock_run_folder(run_dir)
        except Exception as e:  # noqa: BLE001 - ConfigError or an unwritable folder: one line either way
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # hydra.run.dir resolves through it (run_job sets it again)
        self._lock(config.hydra.run.dir)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self._lock(config.hydra.runtime.output_dir)

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN and self.fd is not None:
            os.close(self.fd)  # the next job of this worker process locks its own folder
            self.fd = None
