"""The jobs of a Hydra sweep folder as ``ncu.report`` reads them: each job's overrides and ``metrics.json``, the
points refused at start (``error.txt``), the missing ones, and the planned points (``multirun.yaml``) that never
launched."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

OVERRIDES = Path(".hydra") / "overrides.yaml"
METRICS = "metrics.json"
MULTIRUN = "multirun.yaml"
ERROR = "error.txt"  # written by ncu.cli.refuse for a point refused at start


class ReportError(Exception):
    """A problem with the input that the CLI reports as one line, without a traceback."""


# ----------------------------------------------------------------------------------------------- reading


def _natural_key(text: str) -> list[Any]:
    """Sort key that orders ``2_x`` before ``10_x`` (Hydra job numbers are not zero-padded)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def find_jobs(sweep_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """Job dirs under ``sweep_dir`` as (with metrics.json, without), each in natural path order."""
    root = Path(sweep_dir)
    if not root.exists():
        raise ReportError(f"sweep dir not found: {root}")
    if not root.is_dir():
        raise ReportError(f"not a directory: {root}")
    done: list[Path] = []
    missing: list[Path] = []
    for current, dirs, _files in os.walk(root):
        dirs[:] = sorted((d for d in dirs if d != ".hydra"), key=_natural_key)
        job = Path(current)
        if (job / OVERRIDES).is_file():
            (done if (job / METRICS).is_file() else missing).append(job)
    return done, missing


def parse_value(text: str) -> Any:
    """An override value as YAML: ``0.2`` -> float, ``3`` -> int, ``ncu`` -> str.

    Lists, dicts and other non-scalar results stay as the raw string so that they can be grouped on."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return text


def parse_overrides(path: str | Path) -> dict[str, Any]:
    """``{key: value}`` from a Hydra ``overrides.yaml`` (a list of ``key=value`` strings).

    ``+key``/``++key`` count as ``key``; deletions (``~key``) carry no value and are skipped."""
    try:
        items = yaml.safe_load(Path(path).read_text()) or []
    except yaml.YAMLError as err:
        raise ReportError(f"{path}: not valid YAML ({err.__class__.__name__})") from None
    if not isinstance(items, list):
        raise ReportError(f"{path}: expected a YAML list of key=value strings")
    return overrides_dict(items)


def overrides_dict(items: Iterable[Any]) -> dict[str, Any]:
    """``{key: value}`` of ``key=value`` override strings (see :func:`parse_overrides`)."""
    out: dict[str, Any] = {}
    for item in items:
        text = str(item)
        if text.startswith("~") or "=" not in text:
            continue
        key, value = text.split("=", 1)
        out[key.lstrip("+")] = parse_value(value)
    return out


def planned_points(multirun_yaml: str | Path) -> list[dict[str, Any]] | None:
    """The override dicts of every point a sweep planned, expanded as Hydra's basic sweeper does (the
    cartesian product of the sweeps in ``hydra.sweeper.params`` and on the command line); None when the file
    is unreadable or another sweeper (Optuna, ...) chose the points as it went."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        hydra = (yaml.safe_load(Path(multirun_yaml).read_text()) or {}).get("hydra") or {}
    except (OSError, yaml.YAMLError):
        return None
    sweeper = hydra.get("sweeper") or {}
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    task = list((hydra.get("overrides") or {}).get("task") or [])
    try:
        parsed = OverridesParser.create().parse_overrides(params + task)
        jobs = BasicSweeper.split_arguments(parsed, None)[0]
    except Exception:  # noqa: BLE001 - an override this Hydra cannot parse: no plan, the jobs are still read
        return None
    return [overrides_dict(job) for job in jobs]


def unlaunched_points(root: Path, jobs: Sequence[Path]) -> list[str]:
    """Planned points of the sweeps under ``root`` (their ``multirun.yaml``) that have no job folder, as
    ``key=value`` lists. A sweep none of whose jobs lie under its folder (absolute job dirs) is not checked."""
    out: list[str] = []
    for plan_file in sorted(root.rglob(MULTIRUN)):
        sweep = plan_file.parent
        found = [parse_overrides(job / OVERRIDES) for job in jobs if sweep in job.parents]
        plan = planned_points(plan_file)
        if not plan or not found:
            continue
        swept = [k for k in plan[0] if len({str(p.get(k)) for p in plan}) > 1] or list(plan[0])
        for point in plan:
            if point not in found:
                out.append(f"{sweep}: " + " ".join(f"{k}={point.get(k)}" for k in swept))
            else:
                found.remove(point)
    return out


def read_metrics(path: str | Path) -> dict[str, float]:
    """The numeric entries of a flat ``metrics.json``; anything else (strings, nested dicts) is dropped."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return {
        str(k): float(v)
        for k, v in data.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def collect(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per finished job: override columns, metric columns and ``job_dir``.

    Jobs without a readable metrics.json are not rows: those refused at start are in ``df.attrs["failed"]``
    (``"<dir>: <message>"``), the others in ``df.attrs["missing"]``; planned points without a job folder are in
    ``df.attrs["unlaunched"]``. The column roles are
    in ``df.attrs["override_keys"]`` and ``df.attrs["metric_keys"]`` (each in order of first appearance).
    Raises ReportError when the dir does not exist or holds no finished job."""
    root = Path(sweep_dir)
    done, missing = find_jobs(root)
    if not done and not missing:
        raise ReportError(
            f"no runs found under {root} (expected <job>/{METRICS} with <job>/{OVERRIDES.as_posix()})"
        )
    if not done:
        listed = ", ".join(str(p) for p in missing)
        raise ReportError(f"no finished runs under {root}: {len(missing)} job(s) without {METRICS}: {listed}")
    rows: list[dict[str, Any]] = []
    override_keys: dict[str, None] = {}
    metric_keys: dict[str, None] = {}
    unreadable: list[Path] = []
    for job in done:
        try:
            metrics = read_metrics(job / METRICS)
        except (ValueError, ReportError):
            unreadable.append(job)  # a metrics.json being written or truncated: same as not there yet
            continue
        overrides = parse_overrides(job / OVERRIDES)
        override_keys.update(dict.fromkeys(overrides))
        metric_keys.update(dict.fromkeys(metrics))
        rows.append({**overrides, **metrics, "job_dir": str(job)})
    missing = sorted([*missing, *unreadable], key=lambda p: _natural_key(str(p)))
    failed = [job for job in missing if (job / ERROR).is_file()]
    missing = [job for job in missing if job not in failed]
    if not rows:
        raise ReportError(f"no readable {METRICS} under {root}")
    clash = set(override_keys) & set(metric_keys)
    if clash:
        raise ReportError(f"names used both as override and metric: {sorted(clash)}")
    df = pd.DataFrame(rows)
    df.attrs["override_keys"] = list(override_keys)
    df.attrs["metric_keys"] = list(metric_keys)
    df.attrs["missing"] = [str(p) for p in missing]
    df.attrs["failed"] = [f"{p}: {(p / ERROR).read_text().strip()}" for p in failed]
    df.attrs["unlaunched"] = unlaunched_points(root, [*done, *missing, *failed])
    return df
