"""ncu.bench: the speed CLI's output contract, the timing/memory helpers, the OT problem, the sweep commands."""
from __future__ import annotations

import math
import os
import re

import pytest
import torch

from ncu import bench

RATIO_LINE = re.compile(r"^(\S+): (\d+\.\d+)$")


@pytest.mark.slow
def test_speed_quick_ends_with_the_three_ratio_lines(capsys):
    code = bench.main(["speed", "--quick", "--model", "ncu-micro", "--steps", "2", "--warmup", "1",
                       "--device", "cpu"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    matches = [RATIO_LINE.match(line) for line in lines[-3:]]
    assert all(matches), lines[-3:]
    assert [m.group(1) for m in matches] == ["ncu_stage2/clip", "sinkhorn_share", "clip/open_clip"]
    ratios = {m.group(1): float(m.group(2)) for m in matches}
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())
    # The printed ratios are those of the table's medians (recomputed here from the table rows).
    rows = {}
    for line in lines:
        parts = line.split()
        if parts and parts[0] in ("clip", "ncu_stage1", "ncu_stage2", "sinkhorn", "sinkhorn_structured",
                                  "open_clip", *bench.SWITCH_VARIANTS.values()):
            rows[parts[0]] = (float(parts[1]), float(parts[4]))
    assert set(rows) == {"clip", "ncu_stage1", "ncu_stage2", "sinkhorn", "sinkhorn_structured", "open_clip",
                         *bench.SWITCH_VARIANTS.values()}
    # One line per memory and speed switch: its step time and peak memory against the plain stage-2 step's.
    for switch, name in bench.SWITCH_VARIANTS.items():
        line = next(line for line in lines if line.startswith(f"{switch} / plain ncu_stage2:"))
        time_ratio, memory_ratio = (float(x) for x in re.findall(r"(\d+\.\d+)x", line))
        assert time_ratio == pytest.approx(rows[name][0] / rows["ncu_stage2"][0], abs=0.006)
        assert memory_ratio == pytest.approx(rows[name][1] / rows["ncu_stage2"][1], abs=0.02)
    rows = {k: v[0] for k, v in rows.items()}
    assert ratios["ncu_stage2/clip"] == pytest.approx(rows["ncu_stage2"] / rows["clip"], abs=0.006)
    assert ratios["clip/open_clip"] == pytest.approx(rows["clip"] / rows["open_clip"], abs=0.006)
    solve = max(rows["sinkhorn"], rows["sinkhorn_structured"])
    assert ratios["sinkhorn_share"] == pytest.approx(solve / rows["ncu_stage2"], abs=0.0006)


@pytest.mark.parametrize("reg", ["0.03", "0.1"])
def test_sinkhorn_subcommand_runs_and_early_stop_matches_the_full_run(capsys, reg):
    assert bench.main(["sinkhorn", "--sizes", "32,64", "--device", "cpu", "--reg", reg]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d+)\s+(\d+)x(\d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$",
                      out, flags=re.M)
    assert [(int(r[0]), int(r[1]), int(r[2])) for r in rows] == [(32, 32, 33), (64, 64, 65)]
    for r in rows:
        iters, err, ms, ms_all, diff = int(r[3]), float(r[4]), float(r[5]), float(r[6]), float(r[9])
        assert 1 <= iters <= 100
        assert ms > 0 and ms_all > 0
        if iters < 100:
            assert err < 1e-4  # stopped early only once the row marginals hold to tol
        # Stopping at a row-marginal error below tol leaves the plan (entries about 1/N) nearly unchanged.
        assert diff < 1e-2
    if reg == "0.1":  # a well-conditioned problem: the rule must stop before max_iter
        assert all(int(r[3]) < 100 for r in rows)


def test_stage2_problem_matches_the_objective_construction():
    n, ratio = 50, 0.1
    cost, a, b, mask = bench.stage2_ot_problem(n, nc_ratio=ratio, seed=3)
    assert cost.shape == mask.shape == (n, n + 1)
    assert float(cost.max()) == pytest.approx(1.0) and float(cost.min()) >= 0.0
    assert float(a.sum()) == pytest.approx(float(b.sum())) == pytest.approx(1.0)
    nc = mask[:, n].clone()  # the HN column is allowed exactly on the NC rows
    assert int(nc.sum()) == math.floor(ratio * n)
    for i in range(n):
        assert bool(mask[i, i]) == (not bool(nc[i]))  # an NC row may not keep its own caption
        assert int(mask[i, :n].sum()) == n - int(nc[i])
    # Aligned pairs: clean diagonal costs are lower than the average off-diagonal cost.
    clean = ~nc
    diag = cost[:, :n].diagonal()[clean].mean()
    off = (cost[:, :n].sum() - cost[:, :n].diagonal().sum()) / (n * n - n)
    assert float(diag) < float(off)


def test_summarise_median_and_iqr_by_hand():
    median, iqr = bench.summarise([0.005, 0.001, 0.003, 0.002, 0.004])
    assert median == pytest.approx(3.0)
    assert iqr == pytest.approx(2.0)  # inclusive quartiles of 1..5 ms: 2 and 4
    assert bench.summarise([0.010]) == (pytest.approx(10.0), 0.0)


def test_time_interleaved_rotates_the_order_and_drops_warmup():
    calls: list[str] = []
    variants = [bench.Variant(name, lambda name=name: calls.append(name)) for name in "abc"]
    bench.time_interleaved(variants, steps=2, warmup=1, device=torch.device("cpu"))
    assert calls == list("abc" "bca" "cab")
    assert [len(v.times) for v in variants] == [2, 2, 2]


def test_peak_memory_sees_a_64_mib_tensor():
    with bench.PeakMemory(torch.device("cpu")) as probe:
        pass
    if not probe.method.startswith("RSS high-water"):
        pytest.skip("/proc/self/clear_refs is not writable here")
    with bench.PeakMemory(torch.device("cpu")) as pm:
        x = torch.ones(16 * 1024 * 1024)  # 64 MiB, written so the pages are resident
        del x
    assert 60 * bench.MiB < pm.peak < 200 * bench.MiB


def test_robustness_dry_run_prints_the_sweeps_and_the_report(capsys):
    assert bench.main(["robustness", "--dry-run", "--sweep-dir", "logs/x", "trainer=gpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "python train.py sweep=pretrain trainer=gpu",
        "python train.py sweep=methods hydra.sweep.dir=logs/x/methods trainer=gpu",
        "python train.py sweep=noise_rates hydra.sweep.dir=logs/x/noise_rates trainer=gpu",
        "python train.py sweep=oracle hydra.sweep.dir=logs/x/oracle trainer=gpu",
        f"python -m ncu.report logs/x --metrics {bench.ROBUSTNESS_METRICS} --gain --ignore sweep",
    ]


def test_robustness_sweep_config_covers_rates_methods_and_seeds():
    from ncu.config import compose_config

    def params(name):
        return compose_config([f"sweep={name}"], return_hydra_config=True).hydra.sweeper.params

    assert str(params("pretrain")["noise.rate"]).split(",") == ["0.0", "0.2", "0.4", "0.6"]
    methods = params("methods")
    assert set(str(methods["method"]).split(",")) == {
        "pretrain_only", "clip", "filter", "grad_ascent", "ncu", "ncu_official", "ncu_no_hn", "ncu_no_ot",
        "ncu_stage2_only"}
    assert str(params("noise_rates")["noise.rate"]).split(",") == ["0.0", "0.2", "0.6"]
    oracle = params("oracle")
    assert oracle["method.detector"] == "oracle" and set(str(oracle["method"]).split(",")) == {"filter", "ncu"}
    for name in ("pretrain", "methods", "noise_rates", "oracle"):
        assert str(params(name)["seed"]).split(",") == ["0", "1", "2"]


def test_robustness_jobs_use_the_joblib_launcher_with_one_thread_share_each(capsys, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert bench.main(["robustness", "--jobs", "4", "--sweep-dir", "logs/x"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    launcher = "hydra/launcher=joblib hydra.launcher.n_jobs=4"
    assert lines[0] == f"OMP_NUM_THREADS=2 python train.py sweep=pretrain {launcher}"
    assert lines[2] == f"OMP_NUM_THREADS=2 python train.py sweep=noise_rates hydra.sweep.dir=logs/x/noise_rates {launcher}"
    assert lines[-1] == f"OMP_NUM_THREADS=2 python -m ncu.report logs/x --metrics {bench.ROBUSTNESS_METRICS} --gain --ignore sweep"
