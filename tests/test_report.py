from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import assert_figure
from ncu import report

REPO = Path(__file__).resolve().parents[1]
METHODS = ("ncu", "clip")
RATES = (0.2, 0.5)
SEEDS = (0, 1, 2)


def _job(root: Path, name: str, overrides: list[str], metrics: dict[str, float] | None) -> Path:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    return job


def _sweep(root: Path) -> dict[tuple[str, float], dict[str, list[float]]]:
    """2 methods x 2 noise rates x 3 seeds, plus one job without metrics.json. Returns the raw values."""
    rng = np.random.default_rng(0)
    values: dict[tuple[str, float], dict[str, list[float]]] = {}
    num = 0
    for method in METHODS:
        for rate in RATES:
            group = values.setdefault((method, rate), {"test/rsum": [], "test/zeroshot_top1": [], "other": []})
            for seed in SEEDS:
                rsum = float(rng.uniform(100, 300))
                top1 = 40.0 + 10.0 * seed  # hand-computable: mean 50, std 10 in every group
                other = float(rng.normal())
                group["test/rsum"].append(rsum)
                group["test/zeroshot_top1"].append(top1)
                group["other"].append(other)
                overrides = [f"method={method}", f"noise.rate={rate}", f"seed={seed}", "model=ncu-micro"]
                metrics = {"test/rsum": rsum, "test/zeroshot_top1": top1, "other": other}
                _job(root, f"{num}_method={method},noise.rate={rate}", overrides, metrics)
                num += 1
    _job(root, f"{num}_method=ncu,noise.rate=0.8", ["method=ncu", "noise.rate=0.8", "seed=0"], None)
    return values


def test_parse_value_keeps_types() -> None:
    assert report.parse_value("0.2") == 0.2 and isinstance(report.parse_value("0.2"), float)
    assert report.parse_value("3") == 3 and isinstance(report.parse_value("3"), int)
    assert report.parse_value("ncu") == "ncu"
    assert report.parse_value("true") is True
    assert report.parse_value("[1,2]") == "[1,2]"  # non-scalars stay raw strings: groupable


def test_collect_and_swept_keys(tmp_path: Path) -> None:
    _sweep(tmp_path)
    df = report.collect(tmp_path)
    assert len(df) == 12
    assert df.attrs["missing"] == [str(tmp_path / "12_method=ncu,noise.rate=0.8")]
    assert set(df.attrs["metric_keys"]) == {"test/rsum", "test/zeroshot_top1", "other"}
    assert df["noise.rate"].dtype.kind == "f" and df["seed"].dtype.kind == "i"
    assert df["job_dir"].map(lambda p: Path(p, "metrics.json").is_file()).all()
    # model is constant, seed is the replicate axis: only method (categorical first) and noise.rate remain
    assert report.swept_keys(df) == ["method", "noise.rate"]
    assert report.swept_keys(df, ignore=["noise.*"]) == ["method"]
    assert "seed" in report.swept_keys(df, seed_key="none")


def test_hydra_keys_never_swept(tmp_path: Path) -> None:
    for i in range(2):
        _job(tmp_path, f"{i}_x", [f"hydra.run.dir=/d{i}", f"lr={i}"], {"m": float(i)})
    assert report.swept_keys(report.collect(tmp_path)) == ["lr"]


def test_summarise_matches_numpy(tmp_path: Path) -> None:
    values = _sweep(tmp_path)
    df = report.collect(tmp_path)
    metrics = ["test/rsum", "test/zeroshot_top1", "other"]
    summary = report.summarise(df, ["noise.rate", "method", "seed"], metrics)
    assert list(summary.columns[:3]) == ["method", "noise.rate", "n"]  # categorical keys, then numeric
    assert list(zip(summary["method"], summary["noise.rate"])) == [
        ("clip", 0.2), ("clip", 0.5), ("ncu", 0.2), ("ncu", 0.5)]
    assert (summary["n"] == 3).all()
    for _, row in summary.iterrows():
        raw = values[(row["method"], row["noise.rate"])]
        for m in metrics:
            assert row[f"{m}_mean"] == pytest.approx(np.mean(raw[m]), rel=1e-12)
            assert row[f"{m}_std"] == pytest.approx(np.std(raw[m], ddof=1), rel=1e-12)
        assert row["test/zeroshot_top1_mean"] == pytest.approx(50.0)
        assert row["test/zeroshot_top1_std"] == pytest.approx(10.0)


def test_summarise_single_run_has_no_std() -> None:
    df = pd.DataFrame({"k": ["a", "b", "b"], "m": [1.0, 2.0, 4.0]})
    summary = report.summarise(df, ["k"], ["m"])
    assert summary["n"].tolist() == [1, 2]
    assert math.isnan(summary["m_std"].iloc[0])
    assert summary["m_std"].iloc[1] == pytest.approx(math.sqrt(2.0))  # values 2, 4: (1 + 1) / (2 - 1)
    assert report.format_cell(1.0, math.nan) == "1.00"


def test_write_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    values = _sweep(sweep)
    assert report.main([str(sweep)]) == 0
    out, err = capsys.readouterr()
    assert "12_method=ncu,noise.rate=0.8" in err and "1 job(s) without metrics.json" in err

    md = (sweep / "results.md").read_text()
    assert md == out  # the table printed is the one written
    assert f"Sweep `{sweep}`: 12 job(s) read, 1 missing." in md.splitlines()[0]
    for method in METHODS:
        for rate in RATES:
            raw = values[(method, rate)]["test/rsum"]
            cell = f"{np.mean(raw):.2f} ± {np.std(raw, ddof=1):.2f}"
            assert f"| {method} | {rate} | 3 | {cell} | 50.00 ± 10.00 |" in md
    assert "other" not in md  # not a headline metric

    csv = pd.read_csv(sweep / "results.csv")
    assert list(csv.columns) == ["method", "noise.rate", "n", "test/rsum_mean", "test/rsum_std",
                                 "test/zeroshot_top1_mean", "test/zeroshot_top1_std"]
    assert len(csv) == 4 and (csv["n"] == 3).all()
    assert np.allclose(csv["test/zeroshot_top1_std"], 10.0)

    plot = sweep / "plot_test_rsum_vs_noise.rate.png"
    assert_figure(plot)
    assert_figure(sweep / "plot_test_zeroshot_top1_vs_noise.rate.png")


def test_write_report_options_and_bar_plot(tmp_path: Path) -> None:
    for sub in ("a", "b"):  # nested sweeps, one categorical key: bar charts
        for seed in (0, 1):
            method = "ncu" if sub == "a" else "clip"
            _job(tmp_path / "multirun" / sub, f"{seed}_x", [f"method={method}", f"seed={seed}"],
                 {"train/nc_auroc": 0.5 + seed, "x/y": 1.0})
    out = tmp_path / "out"
    written = report.write_report(tmp_path / "multirun", out_dir=out, metrics=["x/y"])
    assert written["csv"] == out / "results.csv" and written["plot:x/y"] == out / "plot_x_y.png"
    assert_figure(written["plot:x/y"])
    csv = pd.read_csv(written["csv"])
    assert csv["method"].tolist() == ["clip", "ncu"] and csv["n"].tolist() == [2, 2]
    written = report.write_report(tmp_path / "multirun", out_dir=out, all_metrics=True, plots=False)
    assert set(written) == {"csv", "md"}
    assert "| ncu | 2 | 1.00 ± 0.71 | 1.00 ± 0.00 |" in written["md"].read_text()  # 0.5, 1.5 -> std 1/sqrt 2
    with pytest.raises(report.ReportError, match="unknown metric"):
        report.write_report(tmp_path / "multirun", metrics=["nope"])


@pytest.mark.parametrize("make", ["empty", "missing"])
def test_no_runs_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], make: str) -> None:
    target = tmp_path / "sweep"
    if make == "empty":
        (target / "0_a").mkdir(parents=True)
        (target / "0_a" / "metrics.json").write_text("{}")  # no .hydra/overrides.yaml: not a job
    with pytest.raises(SystemExit) as exc:
        report.main([str(target)])
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    if make == "empty":
        assert err == (f"error: no runs found under {target} "
                       "(expected <job>/metrics.json with <job>/.hydra/overrides.yaml)\n")
    else:
        assert err.startswith("error: ") and str(target) in err


def test_cli_subprocess(tmp_path: Path) -> None:
    _sweep(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "ncu.report", str(tmp_path), "--no-plots"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "| clip | 0.2 | 3 |" in proc.stdout and (tmp_path / "results.csv").is_file()


def test_gain_is_the_per_run_difference_from_its_own_pretrained_model(tmp_path: Path) -> None:
    # Two seeds whose starting points differ by far more than the methods' effect: the paired gain sees
    # the effect (+1 and +3 for ncu, -2 twice for clip), the unpaired means do not.
    starts = {0: 100.0, 1: 200.0}
    effect = {("ncu", 0): 1.0, ("ncu", 1): 3.0, ("clip", 0): -2.0, ("clip", 1): -2.0}
    for (method, seed), delta in effect.items():
        _job(tmp_path, f"{method}_{seed}", [f"method={method}", f"seed={seed}"],
             {"test/rsum": starts[seed] + delta, "pretrain/rsum": starts[seed], "test/other": 1.0})
    written = report.write_report(tmp_path, metrics=["test/rsum", "test/other"], gain=True, plots=False)
    csv = pd.read_csv(written["csv"]).set_index("method")
    assert csv.loc["ncu", "gain/rsum_mean"] == pytest.approx(2.0)
    assert csv.loc["ncu", "gain/rsum_std"] == pytest.approx(math.sqrt(2.0))
    assert csv.loc["clip", "gain/rsum_mean"] == pytest.approx(-2.0) and csv.loc["clip", "gain/rsum_std"] == 0.0
    assert "gain/other_mean" not in csv.columns  # no pretrain/other to pair with
    with pytest.raises(report.ReportError, match="--gain needs"):
        report.write_report(tmp_path, metrics=["test/other"], gain=True, plots=False)


def test_versus_pairs_each_run_with_the_reference_of_its_seed(tmp_path: Path) -> None:
    values = _sweep(tmp_path)
    df = report.collect(tmp_path)
    names = report.add_versus(df, ["test/rsum"], {"method": "clip"}, pair_on=["noise.rate"])
    assert names == ["vs/test/rsum"]
    for rate in RATES:
        for i, seed in enumerate(SEEDS):  # each ncu run minus the clip run of the same seed and rate
            row = df[(df["method"] == "ncu") & (df["noise.rate"] == rate) & (df["seed"] == seed)]
            want = values[("ncu", rate)]["test/rsum"][i] - values[("clip", rate)]["test/rsum"][i]
            assert float(row["vs/test/rsum"].iloc[0]) == pytest.approx(want)
    assert (df.loc[df["method"] == "clip", "vs/test/rsum"] == 0).all()
    with pytest.raises(report.ReportError, match="two reference runs"):  # the rate must be paired on too
        report.add_versus(report.collect(tmp_path), ["test/rsum"], {"method": "clip"})
    with pytest.raises(report.ReportError, match="no run has these overrides"):
        report.add_versus(df, ["test/rsum"], {"method": "filter"}, pair_on=["noise.rate"])
    out = tmp_path / "out"
    report.main([str(tmp_path), "--out", str(out), "--no-plots", "--metrics", "test/rsum", "--versus", "method=clip",
                 "--pair-on", "noise.rate"])
    table = pd.read_csv(out / "results.csv")
    ncu = table[(table["method"] == "ncu") & (table["noise.rate"] == RATES[0])]
    diffs = np.subtract(values[("ncu", RATES[0])]["test/rsum"], values[("clip", RATES[0])]["test/rsum"])
    assert float(ncu["vs/test/rsum_mean"].iloc[0]) == pytest.approx(diffs.mean())
    assert float(ncu["vs/test/rsum_std"].iloc[0]) == pytest.approx(diffs.std(ddof=1))
