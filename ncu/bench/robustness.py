"""The noise-rate x method x seed benchmark: its sweep commands and report."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence

from ncu.bench.timing import ROOT

# ----------------------------------------------------------------------------------------------- robustness


ROBUSTNESS_METRICS = ("test/rsum,test/zeroshot_top1,pretrain/rsum,pretrain/zeroshot_top1,pretrain/nc_auroc,"
                      "pretrain/nc_precision,train/nc_auroc,train/nc_precision")
# The method sweeps of the benchmark (conf/sweep), each into its own folder of the sweep dir.
ROBUSTNESS_SWEEPS = ("methods", "noise_rates", "oracle")


def robustness_commands(sweep_dir: str, overrides: Sequence[str] = (), python: str = "python",
                        jobs: int = 1) -> list[list[str]]:
    """Pre-train once per (noise rate, seed), run the method sweeps (every method at 0.4, the main ones at
    0 / 0.2 / 0.6, oracle flags), then the results table with paired gains.

    ``jobs > 1`` runs that many jobs at once through Hydra's joblib launcher (local CPU sweeps).
    """
    extra = list(overrides)
    if jobs > 1:
        extra = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}", *extra]
    return [
        [python, "train.py", "sweep=pretrain", *extra],
        *([python, "train.py", f"sweep={name}", f"hydra.sweep.dir={sweep_dir}/{name}", *extra]
          for name in ROBUSTNESS_SWEEPS),
        [python, "-m", "ncu.report", sweep_dir, "--metrics", ROBUSTNESS_METRICS, "--gain", "--ignore", "sweep"],
    ]


def robustness(sweep_dir: str, overrides: Sequence[str], run: bool, python: str = sys.executable,
               out: Callable[[str], None] = print, jobs: int = 1) -> int:
    commands = robustness_commands(sweep_dir, overrides, python if run else "python", jobs)
    # Parallel jobs share the cores: one OpenMP thread each, or they oversubscribe (up to 9x slower here).
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs))) if jobs > 1 else None
    prefix = f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} " if env else ""
    for cmd in commands:
        out(prefix + shlex.join(cmd))
    if not run:
        return 0
    for cmd in commands:
        code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        if code:
            out(f"failed ({code}): {shlex.join(cmd)}")
            return code
    return 0
