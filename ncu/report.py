"""Offline results table of a Hydra sweep: ``python -m ncu.report <multirun dir>``.

A job is any directory holding ``.hydra/overrides.yaml``, searched recursively (nested sweeps work).
Jobs with a ``metrics.json`` are read; a job refused at start (its ``error.txt``) is listed as failed with its
message; the others (crashed or still running) are listed as missing. Where a sweep's ``multirun.yaml`` gives
its planned points (Hydra's basic sweeper: the command line's and ``hydra.sweeper.params``' sweeps), the
points with no job folder at all are listed as not launched. The swept keys are the override keys whose values differ across the read jobs, minus ``hydra.*``,
the ``--ignore`` patterns and the seed key (the replicate axis). Jobs are grouped by the swept keys and
every metric is summarised per group as mean and sample standard deviation (ddof=1) over the group's runs.

Written into the sweep dir (or ``--out``):
  - ``results.csv``: group keys, ``n`` (runs in the group), ``<metric>_mean``, ``<metric>_std``.
    With n = 1 the std is undefined and left empty (NaN).
  - ``results.md``: the same as a Markdown table of ``mean ± std`` cells (2 decimals; the mean alone when
    n = 1, ``n/a`` when the metric is absent), also printed to stdout.
  - ``plot_<metric>_vs_<key>.png``: when exactly one group key is numeric, the metric against it, one line
    per combination of the categorical keys, error bars = std. Otherwise ``plot_<metric>.png``, a bar chart
    with one bar per group. Drawn with matplotlib's Agg renderer, without touching pyplot's global state.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HEADLINE_METRICS = (
    "test/rsum",
    "test/zeroshot_top1",
    "test/i2t_R@1",
    "test/t2i_R@1",
    "pretrain/rsum",
    "pretrain/zeroshot_top1",
    "train/nc_auroc",
)
from ncu.sweep_jobs import (METRICS, ReportError, collect, parse_value,  # noqa: F401 - the report's inputs
                             planned_points)


# ------------------------------------------------------------------------------------------- summarising


def _norm(value: Any) -> Any:
    """Plain Python scalar, with every flavour of missing (None, NaN, pd.NA) as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_numeric_key(df: pd.DataFrame, key: str) -> bool:
    """True when every present value of column ``key`` is a number (bools are categories)."""
    values = [v for v in (_norm(x) for x in df[key].tolist()) if v is not None]
    return bool(values) and all(_is_number(v) for v in values)


def swept_keys(
    df: pd.DataFrame,
    override_keys: Iterable[str] | None = None,
    seed_key: str = "seed",
    ignore: Iterable[str] = (),
) -> list[str]:
    """Override keys whose values differ across rows: categorical ones first, then numeric ones.

    ``hydra.*``, the seed key and keys matching an ``ignore`` glob pattern are never swept keys."""
    keys = list(override_keys if override_keys is not None else df.attrs.get("override_keys", []))
    patterns = ["hydra.*", *ignore]
    out = []
    for key in keys:
        if key == seed_key or key not in df.columns or any(fnmatch.fnmatchcase(key, p) for p in patterns):
            continue
        if len({_norm(v) for v in df[key].tolist()}) > 1:
            out.append(key)
    return [k for k in out if not is_numeric_key(df, k)] + [k for k in out if is_numeric_key(df, k)]


def default_metrics(metric_keys: Sequence[str]) -> list[str]:
    """The headline metrics that are present, or every metric when none of them is."""
    present = [m for m in HEADLINE_METRICS if m in metric_keys]
    return present or list(metric_keys)


def _sort_value(value: Any, numeric: bool) -> tuple[Any, ...]:
    """Sort key of a group value: missing values last, numbers numerically, the rest as text."""
    if value is None:
        return (1, 0.0 if numeric else "")
    return (0, float(value) if numeric else str(value))


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of the non-NaN values; NaN when too few are left."""
    values = values[~np.isnan(values)]
    mean = float(values.mean()) if values.size else math.nan
    std = float(values.std(ddof=1)) if values.size >= 2 else math.nan
    return mean, std


def summarise(
    df: pd.DataFrame, group_keys: Sequence[str], metrics: Sequence[str], seed_key: str = "seed"
) -> pd.DataFrame:
    """One row per group of ``group_keys``: the keys, ``n`` (runs in the group) and per metric
    ``<metric>_mean`` / ``<metric>_std`` (sample std, ddof=1; NaN when n = 1).

    The seed key is the replicate axis and is dropped from ``group_keys``. Rows are sorted by the
    categorical keys, then by the numeric ones."""
    keys = [k for k in group_keys if k != seed_key]
    for name in [*keys, *metrics]:
        if name not in df.columns:
            raise ReportError(f"column not found: {name}")
    groups: dict[tuple[Any, ...], list[int]] = {}
    columns = {k: [_norm(v) for v in df[k].tolist()] for k in keys}
    for i in range(len(df)):
        groups.setdefault(tuple(columns[k][i] for k in keys), []).append(i)
    numeric = {k: is_numeric_key(df, k) for k in keys}
    order = [k for k in keys if not numeric[k]] + [k for k in keys if numeric[k]]
    position = {k: keys.index(k) for k in order}
    sorted_groups = sorted(
        groups.items(), key=lambda item: [_sort_value(item[0][position[k]], numeric[k]) for k in order]
    )
    values = {m: pd.to_numeric(df[m], errors="coerce").to_numpy(dtype=float) for m in metrics}
    rows = []
    for group, index in sorted_groups:
        row: dict[str, Any] = {k: group[position[k]] for k in order}
        row["n"] = len(index)
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_std"] = _mean_std(values[m][index])
        rows.append(row)
    return pd.DataFrame(rows, columns=[*order, "n", *(f"{m}_{s}" for m in metrics for s in ("mean", "std"))])


def add_gains(df: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    """Add ``gain/<m> = test/<m> - pretrain/<m>`` columns to ``df`` (per run); returns their names."""
    names = []
    for m in metrics:
        base = m.removeprefix("test/")
        if m == base or f"pretrain/{base}" not in df.columns:
            continue
        name = f"gain/{base}"
        df[name] = pd.to_numeric(df[m], errors="coerce") - pd.to_numeric(df[f"pretrain/{base}"], errors="coerce")
        names.append(name)
    if not names:
        raise ReportError("--gain needs test/<metric> chosen and pretrain/<metric> in the runs' metrics.json")
    return names


def add_versus(df: pd.DataFrame, metrics: Sequence[str], versus: dict[str, Any], pair_on: Sequence[str] = (),
               seed_key: str = "seed") -> list[str]:
    """Add ``vs/<m> = m - m of the reference run`` columns (per run); returns their names. The reference
    runs are those whose overrides hold every ``key=value`` of ``versus``; a run is paired with the reference
    of the same seed and the same values of the ``pair_on`` keys (runs without one get NaN). Paired by seed,
    the difference is free of the spread between seeds, as the gains are."""
    for key in [*versus, seed_key, *pair_on]:
        if key not in df.columns:
            raise ReportError(f"--versus/--pair-on: no run has the override {key!r}")
    is_ref = np.ones(len(df), dtype=bool)
    for key, value in versus.items():
        is_ref &= np.array([_norm(v) == value for v in df[key].tolist()])
    if not is_ref.any():
        spec = ",".join(f"{k}={v}" for k, v in versus.items())
        raise ReportError(f"--versus {spec}: no run has these overrides")
    keys = [seed_key, *pair_on]
    pairs = list(zip(*([_norm(v) for v in df[k].tolist()] for k in keys)))  # each run's (seed, pair_on values)
    refs: dict[tuple[Any, ...], int] = {}
    for i in np.flatnonzero(is_ref):
        if pairs[i] in refs:
            raise ReportError(f"--versus: two reference runs for {dict(zip(keys, pairs[i]))} "
                              f"({df['job_dir'].iloc[refs[pairs[i]]]}, {df['job_dir'].iloc[i]}); add --pair-on keys")
        refs[pairs[i]] = int(i)
    names = []
    for m in metrics:
        values = pd.to_numeric(df[m], errors="coerce").to_numpy(dtype=float)
        ref = np.array([values[refs[key]] if key in refs else math.nan for key in pairs])
        df[f"vs/{m}"] = values - ref
        names.append(f"vs/{m}")
    return names


# ---------------------------------------------------------------------------------------------- writing


def format_value(value: Any) -> str:
    """A group value for display: ``0.2``, ``3``, ``ncu``, or ``-`` when the job lacks the key."""
    value = _norm(value)
    if value is None:
        return "-"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def format_cell(mean: float, std: float) -> str:
    """``mean ± std`` to 2 decimals; the mean alone when std is undefined, ``n/a`` without a mean."""
    if math.isnan(mean):
        return "n/a"
    if math.isnan(std):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def to_markdown(summary: pd.DataFrame, metrics: Sequence[str], header: str) -> str:
    """The summary as a Markdown document: header line, table, and what the cells mean."""
    keys = list(summary.columns[: list(summary.columns).index("n")])  # summarise puts the keys before n
    names = [*keys, "n", *metrics]

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [header, "", line(names), line("---" for _ in names)]
    for _, row in summary.iterrows():
        cells = [format_value(row[k]) for k in keys] + [str(int(row["n"]))]
        cells += [format_cell(float(row[f"{m}_mean"]), float(row[f"{m}_std"])) for m in metrics]
        lines.append(line(cells))
    lines += ["", "Cells: mean ± sample std (ddof=1) over the n runs of the row; the mean alone when n = 1."]
    return "\n".join(lines) + "\n"


def sanitise(name: str) -> str:
    """A metric or key name usable in a file name (``test/rsum`` -> ``test_rsum``)."""
    return re.sub(r"[^A-Za-z0-9._@=-]+", "_", name)


def _label(summary: pd.DataFrame, keys: Sequence[str], i: int) -> str:
    return ", ".join(f"{k}={format_value(summary[k].iloc[i])}" for k in keys) or "all runs"


def plot_metrics(
    summary: pd.DataFrame, group_keys: Sequence[str], numeric_keys: Sequence[str], metrics: Sequence[str],
    out_dir: str | Path,
) -> dict[str, Path]:
    """One PNG per metric (see the module docstring); metrics without any value are skipped."""
    from matplotlib.figure import Figure  # Figure draws with the Agg renderer, no pyplot state involved

    out = Path(out_dir)
    written: dict[str, Path] = {}
    x_key = numeric_keys[0] if len(numeric_keys) == 1 else None
    line_keys = [k for k in group_keys if k != x_key]
    for m in metrics:
        mean = summary[f"{m}_mean"].to_numpy(dtype=float)
        std = np.nan_to_num(summary[f"{m}_std"].to_numpy(dtype=float))
        if np.isnan(mean).all():
            continue
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.add_subplot()
        if x_key is not None:
            x = pd.to_numeric(summary[x_key], errors="coerce").to_numpy(dtype=float)
            lines: dict[str, list[int]] = {}
            for i in range(len(summary)):
                lines.setdefault(_label(summary, line_keys, i), []).append(i)
            for label, index in lines.items():
                index = sorted(index, key=lambda i: x[i])
                ax.errorbar(x[index], mean[index], yerr=std[index], marker="o", capsize=3, label=label)
            ax.set_xlabel(x_key)
            if line_keys:
                ax.legend(fontsize="small")
            path = out / f"plot_{sanitise(m)}_vs_{sanitise(x_key)}.png"
        else:
            labels = [_label(summary, group_keys, i) for i in range(len(summary))]
            ax.bar(np.arange(len(summary)), np.nan_to_num(mean), yerr=std, capsize=3)
            ax.set_xticks(np.arange(len(summary)), labels, rotation=30, ha="right", fontsize="small")
            path = out / f"plot_{sanitise(m)}.png"
        ax.set_ylabel(m)
        ax.set_title(f"{m} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        written[f"plot:{m}"] = path
    return written


def write_report(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    *,
    all_metrics: bool = False,
    seed_key: str = "seed",
    ignore: Iterable[str] = (),
    plots: bool = True,
    gain: bool = False,
    versus: dict[str, Any] | None = None,
    pair_on: Sequence[str] = (),
) -> dict[str, Path]:
    """Collect, summarise and write ``results.csv``, ``results.md`` and the plots.

    ``metrics=None`` picks the headline metrics (``all_metrics`` every metric). ``gain`` adds, for each
    chosen ``test/<m>`` whose run also has ``pretrain/<m>``, the per-run difference ``gain/<m>``: every run
    starts from its own seed's pre-trained model, so the paired gain is free of the spread between
    pre-training seeds. ``versus`` (with ``pair_on``) adds ``vs/<m>``, each run against a reference run of
    the same seed (``add_versus``). Missing jobs are listed on stderr. Returns ``{"csv": ..., "md": ...,
    "plot:<metric>": ...}``."""
    root = Path(sweep_dir)
    df = collect(root)
    missing, failed, unlaunched = df.attrs["missing"], df.attrs["failed"], df.attrs["unlaunched"]
    metric_keys = df.attrs["metric_keys"]
    for items, what in ((failed, "refused at start"), (missing, f"without {METRICS} (crashed or still running)"),
                        (unlaunched, "planned but never launched (no job folder)")):
        if items:
            listed = "\n".join(f"  {p}" for p in items)
            print(f"warning: {len(items)} job(s) {what}:\n{listed}", file=sys.stderr)
    if all_metrics:
        chosen = list(metric_keys)
    elif metrics is None:
        chosen = default_metrics(metric_keys)
    else:
        unknown = [m for m in metrics if m not in metric_keys]
        if unknown:
            raise ReportError(f"unknown metric(s): {', '.join(unknown)} (available: {', '.join(metric_keys)})")
        chosen = list(metrics)
    if not chosen:
        raise ReportError(f"no metrics in the {METRICS} files under {root}")
    if gain:
        chosen += add_gains(df, chosen)
    if versus:
        chosen += add_versus(df, [m for m in chosen if not m.startswith("gain/")], versus, pair_on, seed_key)
    keys = swept_keys(df, seed_key=seed_key, ignore=ignore)
    summary = summarise(df, keys, chosen, seed_key=seed_key)
    out = Path(out_dir) if out_dir is not None else root
    out.mkdir(parents=True, exist_ok=True)
    written = {"csv": out / "results.csv", "md": out / "results.md"}
    summary.to_csv(written["csv"], index=False)
    header = f"Sweep `{root}`: {len(df)} job(s) read, {len(missing)} missing."
    if failed or unlaunched:
        header += f" Not run: {len(failed)} refused, {len(unlaunched)} never launched (listed on stderr)."
    written["md"].write_text(to_markdown(summary, chosen, header))
    if plots:
        numeric = [k for k in keys if is_numeric_key(df, k)]
        written.update(plot_metrics(summary, keys, numeric, chosen, out))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; input problems exit with a one-line ``error: ...`` on stderr and code 1."""
    parser = argparse.ArgumentParser(prog="python -m ncu.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", help="Hydra multirun dir (searched recursively for jobs)")
    parser.add_argument("--out", default=None, help="output dir (default: the sweep dir)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--metrics", default=None, help="comma-separated metric names")
    which.add_argument("--all-metrics", action="store_true", help="report every metric")
    parser.add_argument("--seed-key", default="seed", help="replicate axis, never a group key")
    parser.add_argument("--ignore", action="append", default=[],
                        help="override keys (comma-separated, glob patterns) never used for grouping")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--gain", action="store_true",
                        help="also report gain/<m> = test/<m> - pretrain/<m> per run (paired with its own start)")
    parser.add_argument("--versus", default=None, metavar="KEY=VALUE,...",
                        help="also report vs/<m>: each run minus the run of the same seed with these overrides")
    parser.add_argument("--pair-on", default="", help="override keys a run shares with its --versus reference "
                                                      "besides the seed (comma-separated)")
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    versus = None
    if args.versus:
        try:
            versus = {k.strip(): parse_value(v.strip()) for k, v in (item.split("=", 1) for item in
                                                                     args.versus.split(",") if item.strip())}
        except ValueError:
            print(f"error: --versus {args.versus!r}: expected KEY=VALUE[,KEY=VALUE...]", file=sys.stderr)
            raise SystemExit(1) from None
    pair_on = [k.strip() for k in args.pair_on.split(",") if k.strip()]
    ignore = [k.strip() for item in args.ignore for k in item.split(",") if k.strip()]
    try:
        written = write_report(args.sweep_dir, args.out, metrics, all_metrics=args.all_metrics,
                               seed_key=args.seed_key, ignore=ignore, plots=not args.no_plots,
                               gain=args.gain, versus=versus, pair_on=pair_on)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(written["md"].read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
