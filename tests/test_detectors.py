"""Per-sample detectors: the mixture finds a planted noisy mode, the running average matches a float64 loop,
and a training run with each detector logs its detection metrics and estimated rate."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ncu import detectors


def _planted(n: int = 1000, rate: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Own-caption probabilities: clean pairs near 0.6, noisy ones near 0.02 (log-normal spread)."""
    rng = np.random.default_rng(seed)
    noisy = rng.random(n) < rate
    log_p = np.where(noisy, rng.normal(np.log(0.02), 0.6, n), rng.normal(np.log(0.6), 0.3, n))
    return np.clip(np.exp(log_p), 1e-6, 1.0), noisy


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_gmm_recovers_a_planted_noisy_mode_and_its_rate(rate):
    scores, noisy = _planted(rate=rate)
    flags, p_clean, est = detectors.gmm_flags(scores, threshold=0.5)
    flags = flags.numpy()
    tp = (flags & noisy).sum()
    f1 = 2 * tp / (flags.sum() + noisy.sum())
    assert f1 > 0.95 and abs(est - noisy.mean()) < 0.03
    # the posterior orders samples as their scores do (monotone in the loss)
    order = np.argsort(scores)
    assert np.all(np.diff(p_clean.numpy()[order]) >= -1e-6)


def test_gmm_without_two_modes_flags_nothing():
    flags, p, est = detectors.gmm_flags(np.full(50, 0.3))
    assert not flags.any() and torch.all(p == 1) and est == 0.0
    flags, _, _ = detectors.gmm_flags(np.array([]))
    assert flags.numel() == 0


def test_ema_update_matches_a_float64_loop():
    rng = np.random.default_rng(1)
    n, m = 20, 0.8
    bank = torch.full((n,), float("nan"))
    ref = [None] * n
    for _ in range(30):
        index = rng.choice(n, size=6, replace=False)
        scores = rng.random(6)
        got = detectors.ema_update(bank, torch.from_numpy(index), torch.from_numpy(scores).float(), m)
        for i, s in zip(index, scores):
            ref[i] = s if ref[i] is None else m * ref[i] + (1 - m) * s
        np.testing.assert_allclose(got.numpy(), [ref[i] for i in index], rtol=1e-5)
    seen = [i for i in range(n) if ref[i] is not None]
    assert torch.isnan(bank[[i for i in range(n) if ref[i] is None]]).all()
    np.testing.assert_allclose(bank[seen].numpy(), [ref[i] for i in seen], rtol=1e-5)
    with pytest.raises(ValueError, match="momentum"):
        detectors.ema_update(bank, torch.tensor([0]), torch.tensor([0.5]), 1.0)


def test_history_is_an_ema_of_log_scores_by_sample_over_every_step():
    rng = np.random.default_rng(2)
    n, m = 12, 0.7
    memory, cpu = detectors.SampleMemory(n), torch.device("cpu")
    ref: list[float | None] = [None] * n
    for step in range(25):
        index = rng.choice(n, size=5, replace=False)
        scores = rng.uniform(1e-3, 1.0, 5)
        if step == 3:  # a batch with an unknown sample (index -1) is not recorded at all
            memory.observe(torch.tensor([0, -1]), torch.tensor([0.5, 0.5]), m, cpu)
        memory.observe(torch.from_numpy(index), torch.from_numpy(scores).float(), m, cpu)
        for i, s in zip(index, scores):
            ref[i] = np.log(s) if ref[i] is None else m * ref[i] + (1 - m) * np.log(s)
    seen = [i for i in range(n) if ref[i] is not None]
    np.testing.assert_allclose(memory.history[seen].numpy(), [ref[i] for i in seen], rtol=1e-5)
    assert torch.isnan(memory.history[[i for i in range(n) if ref[i] is None]]).all()


@pytest.mark.slow
def test_the_history_spans_pretraining_and_travels_with_the_pretraining_cache(make_cfg):
    """Pre-training (a stage that flags nothing) records every sample's history; the cache carries it, a run
    loading the cache starts from it, and fine-tuning folds its own steps in."""
    from ncu import run

    cfg = make_cfg("method=filter", "method.detector=ema")
    metrics, objects = run.train(cfg)
    for key in ("train/nc_f1", "train/nc_precision", "train/nc_recall", "train/nc_auroc", "train/nc_rate_est"):
        assert key in metrics and np.isfinite(metrics[key]), key
    (cache,) = Path(cfg.paths.pretrain_dir).glob("*.ckpt")
    cached = torch.load(cache, weights_only=False)["ncu_sample_history"]
    n = len(objects["datamodule"].datasets["train"])
    assert cached.shape == (n,) and torch.isfinite(cached).float().mean() > 0.9 and (cached <= 0).all()
    final = objects["module"].memory.history.cpu()
    seen = torch.isfinite(cached)
    assert torch.isfinite(final[seen]).all() and not torch.allclose(final[seen], cached[seen])
    _, _, fresh = run.build(cfg)
    assert fresh.memory.history is None and run.load_cached_pretrain(fresh, cache)
    torch.testing.assert_close(fresh.memory.history.cpu(), cached, equal_nan=True)


@pytest.mark.slow
def test_a_run_with_the_mixture_logs_f1_the_estimated_rate_and_the_pass(make_cfg):
    from ncu.run import train

    cfg = make_cfg("method=filter", "method.detector=gmm", "method.detection.source=pass")
    metrics, objects = train(cfg)
    for key in ("train/nc_f1", "train/nc_precision", "train/nc_recall", "train/nc_auroc", "train/nc_rate_est"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert 0 < metrics["train/nc_rate_est"] < 1
    module = objects["module"]
    assert module.memory.flags.shape == (len(objects["datamodule"].datasets["train"]),)
    assert metrics["train/nc_pass_seconds"] > 0
    on_disk = json.loads((objects["run_dir"] / "metrics.json").read_text())
    assert on_disk["train/nc_rate_est"] == pytest.approx(metrics["train/nc_rate_est"])


def test_the_family_is_the_detectors_a_config_may_name():
    from ncu.choices import DETECTORS

    assert tuple(detectors.REGISTRY) == DETECTORS
    assert [detectors.REGISTRY[n].per_sample for n in DETECTORS] == [False, False, True, True]
    with pytest.raises(ValueError, match="method.detector='vote' is unknown"):
        detectors.build("vote", {})
