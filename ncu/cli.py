"""What the entry points do when a command fails on bad input, and a sweep's exit status.

A refused run prints one ``error:`` line. Alone, it exits 2 and leaves no folder behind. Inside a multirun it
fails that point only: the message goes to ``<job dir>/error.txt`` (where ``ncu.report`` finds it), Hydra goes
on with the other points, and :class:`SweepExitCode` makes the sweep exit 2 at its end, naming the failed ones.
Light imports only (no torch): the entry points call this before the heavy modules load.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from ncu.files import atomic_path, discard_unused_output

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
