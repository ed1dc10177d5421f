"""Timing and memory helpers of the benchmarks: interleaved variants, medians, peak memory."""
from __future__ import annotations

import ctypes
import gc
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024.0 * 1024.0


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
