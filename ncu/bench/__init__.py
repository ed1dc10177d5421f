"""Benchmarks: ``python -m ncu.bench speed | sinkhorn | robustness``.

- ``speed``: one process, one model, one batch. Times a ``clip`` step, an NCU stage-1 (``ncu_hn``) step and an
  NCU stage-2 (``ncu_unlearn``) step of :class:`ncu.lit_module.CLIPUnlearner` (training_step + backward +
  AdamW step, module methods called directly, no Trainer), the Sinkhorn solve of the stage-2 problem alone,
  and a plain open_clip loop (``ClipLoss`` + ``encode_image``/``encode_text`` + AdamW). The variants are
  interleaved (round robin, rotating the order each repetition) so that machine noise hits all of them
  alike, and every step starts from the same weights. The memory and speed switches are timed the same way
  against the plain stage-2 step: ``model.grad_checkpointing``, ``model.compile`` (its first warm-up round
  compiles; ``--no-compile`` leaves it out) and ``optim.accum_freq=4`` on the same batch (the accumulation's
  overhead: a second encoding of every micro-batch), one line each with its step-time and peak-memory ratios.
  Ends with three lines: ``ncu_stage2/clip``,
  ``sinkhorn_share`` (Sinkhorn solve / stage-2 step) and ``clip/open_clip``.
- ``sinkhorn``: time, memory and iterations of the stage-2 OT solve for global batches 64..4096, with our
  stopping rule and with all ``max_iter`` iterations.
- ``robustness``: the sweep commands of the noise-rate x method x seed benchmark and its report.

On CPU the timings use one torch thread by default (``--threads``): ratios then reflect the work done,
not how a shared machine schedules a second OpenMP thread.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from ncu.bench.robustness import ROBUSTNESS_METRICS, ROBUSTNESS_SWEEPS, robustness, robustness_commands
from ncu.bench.sinkhorn import sinkhorn_scaling, stage2_ot_problem
from ncu.bench.speed import FINAL_KEYS, SWITCH_VARIANTS, speed
from ncu.bench.timing import MiB, PeakMemory, Variant, summarise, time_interleaved

__all__ = ["FINAL_KEYS", "MiB", "PeakMemory", "ROBUSTNESS_METRICS", "ROBUSTNESS_SWEEPS", "Variant", "main", "parser",
           "robustness", "robustness_commands", "SWITCH_VARIANTS", "sinkhorn_scaling", "speed", "stage2_ot_problem",
           "summarise",
           "time_interleaved"]

# ----------------------------------------------------------------------------------------------- CLI


def _sizes(text: str) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s.strip()]
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError(f"sizes must be integers >= 2, got {text!r}")
    return sizes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ncu.bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed", help="training-step speed: clip, NCU stage 1/2, Sinkhorn, open_clip loop")
    s.add_argument("--quick", action="store_true", help="small batch and few steps (under a minute on 2 cores)")
    s.add_argument("--model", default=None, help="open_clip architecture (default: ncu-tiny on CPU, ViT-B-32 on CUDA)")
    s.add_argument("--batch", type=int, default=None, help="batch size (default 128; 64 with --quick)")
    s.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; 3 with --quick)")
    s.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; 1 with --quick)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--precision", choices=("32", "bf16"), default=None,
                   help="autocast for every variant (default: bf16 on CUDA as trainer=gpu, 32 on CPU)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-compile", action="store_true", help="leave out the model.compile variant")
    s.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared machine a second OpenMP thread that has to "
                        "wait for a core slows small ops by orders of magnitude; 0 = torch's choice)")
    k = sub.add_parser("sinkhorn", help="Sinkhorn time/memory/iterations per global batch size")
    k.add_argument("--sizes", type=_sizes, default=[64, 128, 256, 512, 1024, 2048, 4096])
    k.add_argument("--device", default=None)
    k.add_argument("--reg", type=float, default=0.03)
    k.add_argument("--max-iter", type=int, default=100)
    k.add_argument("--tol", type=float, default=1e-4)
    k.add_argument("--nc-ratio", type=float, default=0.1)
    k.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's choice)")
    r = sub.add_parser("robustness", help="the noise-rate x method x seed sweeps and their report")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="launch the commands (subprocesses, in order)")
    mode.add_argument("--dry-run", action="store_true", help="only print them (the default)")
    r.add_argument("--sweep-dir", default="logs/train/multiruns/robustness")
    r.add_argument("--jobs", type=int, default=1,
                   help="jobs at once through Hydra's joblib launcher, one OMP thread share each (default 1)")
    r.add_argument("overrides", nargs="*", help="extra Hydra overrides for both train.py sweeps")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "robustness":
        return robustness(args.sweep_dir, args.overrides, args.run, jobs=args.jobs)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        if args.command == "sinkhorn":
            sinkhorn_scaling(args.sizes, device, args.reg, args.max_iter, args.tol, args.nc_ratio)
            return 0
        quick = args.quick
        model = args.model or ("ViT-B-32" if device.type == "cuda" else "ncu-tiny")
        speed(model, args.batch or (64 if quick else 128), args.steps or (3 if quick else 10),
              args.warmup if args.warmup is not None else (1 if quick else 2), device,
              args.precision or ("bf16" if device.type == "cuda" else "32"), args.seed,
              compile=not args.no_compile)
        return 0
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) keep their setting


if __name__ == "__main__":
    sys.exit(main())
