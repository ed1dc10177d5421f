"""Benchmarks: ``python -m ncu.bench speed | sinkhorn | robustness``.

- ``speed``: one process, one model, one batch. Times a ``clip`` step, an NCU stage-1 (``ncu_hn``) step and an
  NCU stage-2 (``ncu_unlearn``) step of :class:`ncu.lit_module.CLIPUnlearner` (training_step + backward +
  AdamW step, module methods called directly, no Trainer), the Sinkhorn solve of the stage-2 problem alone,
  and a plain open_clip loop (``ClipLoss`` + ``encode_image``/``encode_text`` + AdamW). The variants are
  interleaved (round robin, rotating the order each repetition) so that machine noise hits all of them
  alike, and every step starts from the same weights. Ends with three lines: ``ncu_stage2/clip``,
  ``sinkhorn_share`` (Sinkhorn solve / stage-2 step) and ``clip/open_clip``.
- ``sinkhorn``: time, memory and iterations of the stage-2 OT solve for global batches 64..4096, with our
  stopping rule and with all ``max_iter`` iterations.
- ``robustness``: the sweep commands of the noise-rate x method x seed benchmark and its report.

On CPU the timings use one torch thread by default (``--threads``): ratios then reflect the work done,
not how a shared machine schedules a second OpenMP thread.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import random
import resource
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024.0 * 1024.0
FINAL_KEYS = ("ncu_stage2/clip", "sinkhorn_share", "clip/open_clip")


# ----------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarise(times_s: Sequence[float]) -> tuple[float, float]:
    """Median and interquartile range, in milliseconds."""
    ms = [1e3 * t for t in times_s]
    if len(ms) < 2:
        return ms[0], 0.0
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    return statistics.median(ms), q3 - q1


def _proc_status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def _malloc_trim() -> None:
    # Hand freed heap pages back to the OS, so the RSS before a block is what is really in use.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory a block adds on top of what was in use when it started (bytes, in ``.peak``).

    CUDA: ``max_memory_allocated`` minus ``memory_allocated`` before. CPU: the process RSS high-water mark
    (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the RSS before; where that reset is not
    allowed, the ``getrusage`` ``ru_maxrss`` growth (a lower bound: it never goes down).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0.0
        self.method = ""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "CUDA max_memory_allocated - allocated before"
            return self
        _malloc_trim()
        self.hwm = _reset_rss_peak()
        if self.hwm:
            self.base = 1024 * (_proc_status_kib("VmRSS") or 0)
            self.method = "RSS high-water mark (VmHWM after a clear_refs reset) - RSS before"
        else:
            self.base = 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "getrusage ru_maxrss growth (lower bound)"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = float(torch.cuda.max_memory_allocated(self.device) - self.base)
        elif self.hwm:
            self.peak = float(max(0, 1024 * (_proc_status_kib("VmHWM") or 0) - self.base))
        else:
            self.peak = float(max(0, 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base))


@dataclass
class Variant:
    """One timed thing: ``prepare`` (untimed: weights, stage, grads) then ``run`` (timed)."""

    name: str
    run: Callable[[], Any]
    prepare: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)
    peak: float = float("nan")
    note: str = ""


def time_interleaved(variants: list[Variant], steps: int, warmup: int, device: torch.device) -> None:
    """Round robin over the variants, ``warmup + steps`` rounds; the start rotates every round."""
    k = len(variants)
    for r in range(warmup + steps):
        for j in range(k):
            v = variants[(r + j) % k]
            v.prepare()
            sync(device)
            t0 = time.perf_counter()
            v.run()
            sync(device)
            if r >= warmup:
                v.times.append(time.perf_counter() - t0)


def measure_peaks(variants: list[Variant], device: torch.device) -> str:
    """One untimed extra run of each variant under :class:`PeakMemory`; returns the method used."""
    method = ""
    for v in variants:
        v.prepare()
        with PeakMemory(device) as pm:
            v.run()
        v.peak, method = pm.peak, pm.method
    return method


# ----------------------------------------------------------------------------------------------- problems


def stage2_ot_problem(
    n: int,
    nc_ratio: float = 0.1,
    dim: int = 256,
    align: float = 0.35,
    noise_rate: float = 0.2,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stage-2 OT problem ``(cost (N, N+1), a, b, mask)`` of a synthetic global batch.

    Unit image features v; a clean caption is ``align * v_i`` plus isotropic noise (cos(v_i, t_i) about
    ``align``, unrelated pairs about 0 +- 1/sqrt(dim), as for a trained CLIP); a ``noise_rate`` fraction of
    captions is shuffled among their pairs; the negated caption sits at cos about -0.45 from its caption
    (inside the band). Flags, mask, cost and marginals are built as ``ncu.objectives.ncu`` builds them.
    """
    from ncu.objectives import ncu as ncu_obj

    if math.floor(nc_ratio * n + 1e-9) < 1:
        raise ValueError(f"nc_ratio={nc_ratio} flags no pair of a batch of {n}: the HN column would get no mass")
    g = torch.Generator().manual_seed(seed)

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=g), dim=-1)

    v = unit(n, dim)
    partner = torch.arange(n)
    noisy = (torch.rand(n, generator=g) < noise_rate).nonzero().flatten()
    partner[noisy] = noisy[torch.randperm(len(noisy), generator=g)]
    t = F.normalize(align * v[partner] + math.sqrt(1 - align**2) * unit(n, dim), dim=1)
    tn = F.normalize(-0.45 * t + math.sqrt(1 - 0.45**2) * unit(n, dim), dim=1)
    a_ext = torch.cat([v @ t.T, (v * tn).sum(dim=1, keepdim=True)], dim=1)
    nc = ncu_obj.select_nc(ncu_obj.nc_scores(v, t, 100.0), nc_ratio)
    dist = 1.0 - a_ext
    cost = dist / dist.max()
    mask = ncu_obj.build_mask(nc, use_hn=True)
    a = torch.full((n,), 1.0 / n)
    b = torch.full((n + 1,), 1.0 / (n + 1))
    return tuple(x.to(device) for x in (cost, a, b, mask))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- speed


def compose_method(method: str) -> Any:
    """The run config with ``method=<method>`` (the real conf/ files, Hydra compose API)."""
    from ncu.config import compose_config

    return compose_config([f"method={method}"])


def stage_of(cfg: Any, objective: str) -> dict:
    """The method's stage with this objective (not pre-training), as the run plans it."""
    from ncu.config import plan_stages

    for name, stage in plan_stages(cfg):
        if name != "pretrain" and stage["objective"] == objective:
            return stage
    raise KeyError(f"method {cfg.method.name!r} has no stage with objective {objective!r}")


def bench_batch(tokenizer: Any, n: int, image_size: int | tuple[int, int], noise_rate: float, seed: int,
                device: torch.device) -> dict[str, Any]:
    """Random images + real emoji-name captions (``noise_rate`` of them shuffled), in the training batch format."""
    from ncu.data.embedded import embedded_pairs

    rng = random.Random(seed)
    pool = embedded_pairs(("twemoji",))["caption"].tolist()
    captions = [pool[rng.randrange(len(pool))] for _ in range(n)]
    noisy_idx = [i for i in range(n) if rng.random() < noise_rate]
    moved = noisy_idx[:]
    rng.shuffle(moved)
    original = list(captions)
    for i, j in zip(noisy_idx, moved):
        captions[i] = original[j]
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    g = torch.Generator().manual_seed(seed)
    noisy = torch.zeros(n, dtype=torch.bool)
    noisy[noisy_idx] = True
    return {
        "image": torch.randn(n, 3, h, w, generator=g).to(device),
        "text": tokenizer(captions).to(device),
        "noisy": noisy.to(device),
        "caption": captions,
        "index": torch.arange(n, device=device),
    }


def model_image_size(name: str, model: torch.nn.Module) -> int | tuple[int, int]:
    import open_clip

    cfg = open_clip.get_model_config(name) or {}
    size = (cfg.get("vision_cfg") or {}).get("image_size") or getattr(model.visual, "image_size", 224)
    return tuple(size) if isinstance(size, (list, tuple)) else int(size)


def open_clip_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's training-script split: no weight decay on gains, biases and the logit scale."""
    def exclude(n: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]


class _RecordingSolver:
    """Passes calls through to ``solver`` and keeps a copy of the last problem it was given."""

    def __init__(self, solver: Callable) -> None:
        self.solver, self.last = solver, None

    def __call__(self, cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None):
        self.last = tuple(x.clone() if x is not None else None for x in (cost, a, b, mask))
        return self.solver(cost, a, b, mask)


@dataclass
class SpeedSetup:
    """The speed benchmark's variants, built on one model and one batch."""

    variants: list[Variant]
    modules: dict[str, Any]
    batch: dict[str, Any]


def speed_setup(model_name: str, batch_size: int, device: torch.device, precision: str = "32",
                seed: int = 0) -> SpeedSetup:
    """Model, batch, modules, optimizers and the six variants of :func:`speed` (nothing timed yet)."""
    import open_clip
    from omegaconf import OmegaConf

    from ncu import stages
    from ncu.lit_module import LOG_SCALE_MAX, CLIPUnlearner
    from ncu.models import factory
    from ncu.ot import sinkhorn

    torch.manual_seed(seed)
    bundle = factory.create(model_name, None)
    model = bundle.model.to(device).train()
    clip_cfg, ncu_cfg = compose_method("clip"), compose_method("ncu")
    optim = OmegaConf.to_container(ncu_cfg.optim, resolve=True)
    clip_method = OmegaConf.to_container(clip_cfg.method, resolve=True)
    ncu_method = OmegaConf.to_container(ncu_cfg.method, resolve=True)
    ncu_method["solver"] = OmegaConf.to_container(ncu_cfg.solver, resolve=True)
    clip_mod = CLIPUnlearner(model, bundle.tokenizer, clip_method, optim, config={"seed": seed}).to(device)
    ncu_mod = CLIPUnlearner(model, bundle.tokenizer, ncu_method, optim, config={"seed": seed}).to(device)
    batch = bench_batch(bundle.tokenizer, batch_size, model_image_size(model_name, model), 0.2, seed, device)

    # Every step starts from these weights (the model's and the negation prompt's).
    params = list(ncu_mod.parameters())
    snapshot = [p.detach().clone() for p in params]

    def restore() -> None:
        with torch.no_grad():
            for p, s in zip(params, snapshot):
                p.copy_(s)
        ncu_mod.zero_grad(set_to_none=True)
        clip_mod.detect.reset()
        ncu_mod.detect.reset()

    def amp() -> torch.autocast:
        if precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=device.type, enabled=False)

    def lightning_variant(name: str, module: CLIPUnlearner, cfg: Any, objective: str) -> Variant:
        stage = stage_of(cfg, objective)
        module.set_stage(objective, stage)
        opt = stages.make_adamw(module, stage, optim)  # as CLIPUnlearner.configure_optimizers, no schedule

        def prepare() -> None:
            restore()
            module.set_stage(objective, stage)

        def run() -> None:
            # What Lightning's automatic optimisation does per batch (autocast around training_step only).
            opt.zero_grad(set_to_none=True)
            with amp():
                loss = module.training_step(batch, 0)
            loss.backward()
            opt.step()
            module.on_train_batch_end(loss, batch, 0)

        return Variant(name, run, prepare)

    clip_v = lightning_variant("clip", clip_mod, clip_cfg, "clip")
    hn_v = lightning_variant("ncu_stage1", ncu_mod, ncu_cfg, "ncu_hn")
    ul_v = lightning_variant("ncu_stage2", ncu_mod, ncu_cfg, "ncu_unlearn")

    # The plain open_clip loop a user would write instead.
    clip_stage = stage_of(clip_cfg, "clip")
    loss_fn = open_clip.loss.ClipLoss()
    oc_opt = torch.optim.AdamW(open_clip_param_groups(model, clip_stage["weight_decay"]), lr=clip_stage["lr"],
                               betas=tuple(optim["betas"]), eps=optim["eps"])

    def oc_prepare() -> None:
        restore()
        for p in model.parameters():
            p.requires_grad_(True)

    def oc_run() -> None:
        oc_opt.zero_grad(set_to_none=True)
        with amp():
            img = model.encode_image(batch["image"], normalize=True)
            txt = model.encode_text(batch["text"], normalize=True)
            loss = loss_fn(img, txt, model.logit_scale.exp())
        loss.backward()
        oc_opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, LOG_SCALE_MAX)

    oc_v = Variant("open_clip", oc_run, oc_prepare)

    # The OT problem the stage-2 step solves, captured from one step, then its solve timed alone.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        solver = ncu_mod.solver
        ncu_mod.solver = recorder = _RecordingSolver(solver)
        ul_v.prepare()
        ul_v.run()
        ncu_mod.solver = solver
    problem = recorder.last
    _, info = sinkhorn(*problem, reg=solver.reg, max_iter=solver.max_iter, tol=solver.tol, return_info=True)
    sk_v = Variant("sinkhorn", lambda: solver(*problem), note=f"{info.n_iter} it, this batch")
    # The same size with the similarity structure of a trained CLIP (a random-init model's is flatter).
    structured = stage2_ot_problem(batch_size, nc_ratio=ncu_method.get("nc_ratio", 0.1), seed=seed, device=device)
    _, sinfo = sinkhorn(*structured, reg=solver.reg, max_iter=solver.max_iter, tol=solver.tol, return_info=True)
    sks_v = Variant("sinkhorn_structured", lambda: solver(*structured), note=f"{sinfo.n_iter} it, synthetic")
    return SpeedSetup([clip_v, hn_v, ul_v, sk_v, sks_v, oc_v], {"clip": clip_mod, "ncu": ncu_mod, "model": model},
                      batch)


def speed(model_name: str, batch_size: int, steps: int, warmup: int, device: torch.device,
          precision: str = "32", seed: int = 0, out: Callable[[str], None] = print) -> dict[str, float]:
    """Run the interleaved speed benchmark, print the table and the three ratio lines; return the ratios."""
    setup = speed_setup(model_name, batch_size, device, precision, seed)
    variants = setup.variants
    with warnings.catch_warnings():
        # self.log without a Trainer warns and returns: the steps run without Lightning's logging.
        warnings.filterwarnings("ignore", message=".*self.log.*")
        time_interleaved(variants, steps, warmup, device)
        mem_method = measure_peaks(variants, device)

    med = {v.name: summarise(v.times)[0] for v in variants}
    out(f"device: {device} ({torch.get_num_threads()} threads), model: {model_name}, batch: {batch_size}, "
        f"precision: {precision}, steps: {steps} after {warmup} warm-up, interleaved")
    out(f"peak memory: {mem_method}")
    out(f"{'variant':<20} {'median ms':>10} {'IQR ms':>9} {'x clip':>7} {'peak MiB':>9}  note")
    for v in variants:
        m, iqr = summarise(v.times)
        out(f"{v.name:<20} {m:>10.2f} {iqr:>9.2f} {m / med['clip']:>7.3f} {v.peak / MiB:>9.1f}  {v.note}")
    # The share is charged with the slower of the two solves: the captured one reflects this random-init model.
    sink = max(med["sinkhorn"], med["sinkhorn_structured"])
    ratios = {
        "ncu_stage2/clip": med["ncu_stage2"] / med["clip"],
        "sinkhorn_share": sink / med["ncu_stage2"],
        "clip/open_clip": med["clip"] / med["open_clip"],
    }
    out(f"ncu_stage2/clip: {ratios['ncu_stage2/clip']:.2f}")
    out(f"sinkhorn_share: {ratios['sinkhorn_share']:.3f}")
    out(f"clip/open_clip: {ratios['clip/open_clip']:.2f}")
    return ratios


# ----------------------------------------------------------------------------------------------- sinkhorn


def sinkhorn_scaling(sizes: Sequence[int], device: torch.device, reg: float = 0.03, max_iter: int = 100,
                     tol: float = 1e-4, nc_ratio: float = 0.1, budget_s: float = 1.0, max_reps: int = 5,
                     seed: int = 0, out: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Time and memory of the stage-2 solve per global batch size: our stopping rule vs all ``max_iter``."""
    from ncu.ot import sinkhorn

    def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
        result = fn()  # warm-up, and the result
        times: list[float] = []
        while len(times) < max_reps and (not times or sum(times) < budget_s):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), result

    out(f"device: {device} ({torch.get_num_threads()} threads), reg={reg}, max_iter={max_iter}, tol={tol}, "
        f"NC ratio {nc_ratio}; cost from aligned + noisy unit embeddings (see ncu.bench.stage2_ot_problem)")
    out(f"{'N':>5} {'shape':>12} {'iters':>6} {'err':>9} {'ms':>9} {'ms all':>9} {'x faster':>8} "
        f"{'peak MiB':>9} {'max|dP|*N':>10}")
    rows = []
    for n in sizes:
        problem = stage2_ot_problem(n, nc_ratio=nc_ratio, seed=seed, device=device)
        t_rule, (plan, info) = timed(lambda p=problem: sinkhorn(*p, reg=reg, max_iter=max_iter, tol=tol,
                                                       return_info=True))
        # All iterations: a single convergence check, on the last one.
        t_all, (plan_all, _) = timed(lambda p=problem: sinkhorn(*p, reg=reg, max_iter=max_iter, tol=tol,
                                                      return_info=True, check_every=max_iter))
        with PeakMemory(device) as pm:
            sinkhorn(*problem, reg=reg, max_iter=max_iter, tol=tol)
        diff = float((plan - plan_all).abs().max()) * n
        row = {"n": n, "iters": info.n_iter, "err": info.err, "ms": 1e3 * t_rule, "ms_all": 1e3 * t_all,
               "peak_mib": pm.peak / MiB, "plan_diff": diff}
        rows.append(row)
        out(f"{n:>5} {f'{n}x{n + 1}':>12} {info.n_iter:>6} {info.err:>9.2e} {row['ms']:>9.2f} {row['ms_all']:>9.2f} "
            f"{t_all / t_rule:>8.2f} {row['peak_mib']:>9.1f} {diff:>10.2e}")
        del problem, plan, plan_all
    out(f"peak memory: {pm.method}")
    return rows


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
              args.precision or ("bf16" if device.type == "cuda" else "32"), args.seed)
        return 0
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) keep their setting


if __name__ == "__main__":
    sys.exit(main())
