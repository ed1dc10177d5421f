"""DDP on 2 CPU processes (gloo): the NCU step on a split global batch equals one process on the whole batch.

Each rank holds half of one fixed global batch; the module gathers features from both ranks
(``all_gather(..., sync_grads=True)``), selects the noisy correspondences, computes the stage loss over
the global batch, and DDP averages the parameter gradients. The loss, the NC selection and the averaged
gradients must match a single process that sees the whole batch at once.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import compose_cfg

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

WORLD = 2
PER_RANK = 12  # global batch 24: nc_ratio 0.4 flags floor(9.6) = 9 pairs
WORDS = (["red", "blue", "small", "old", "green", "tiny"], ["cat", "dog", "car", "tree", "house", "bird"],
         ["near", "under", "behind", "on"], ["a table", "the sea", "a hill", "the road", "a box"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(tokenizer: Any, n: int) -> list[dict[str, Any]]:
    """n fixed pairs (random 32 px images, varied captions, a few marked noisy) as dataset items."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        pick = [w[int(torch.randint(len(w), (1,), generator=g))] for w in WORDS]
        caption = f"a {pick[0]} {pick[1]} {pick[2]} {pick[3]}"
        items.append({"image": torch.randn(3, 32, 32, generator=g), "text": tokenizer([caption])[0],
                      "caption": caption, "index": i, "noisy": i % 3 == 0})
    return items


def _spec(tmp_path: Path, method: str = "ncu_official", *extra: str) -> dict[str, Any]:
    """Plain-dict pieces of the composed smoke config: model name, method (with solver), optim, stages."""
    from omegaconf import OmegaConf

    from ncu.config import plan_stages

    cfg = compose_cfg(["experiment=smoke", f"method={method}", "logger=none", "print_table=false",
                       *(["method.negation.perturb.enabled=false"] if method.startswith("ncu") else []), *extra],
                      tmp_path=tmp_path)
    method = OmegaConf.to_container(cfg.method, resolve=True)
    method["solver"] = OmegaConf.to_container(cfg.solver, resolve=True)
    stages = dict(plan_stages(cfg))
    return {"model": cfg.model.name, "method": method, "optim": OmegaConf.to_container(cfg.optim, resolve=True),
            "stages": {name: stage for name, stage in stages.items() if name != "pretrain"}}


def _module(spec: dict[str, Any]) -> Any:
    """The Lightning module of ``spec`` (random init; each run loads the shared weights)."""
    from ncu.lit_module import CLIPUnlearner
    from ncu.models import factory

    bundle = factory.create(spec["model"], None)
    module = CLIPUnlearner(bundle.model, bundle.tokenizer, spec["method"], spec["optim"], config={"seed": 0})
    module.memory.num_train = WORLD * PER_RANK
    return module


def _data(rank_items: list[dict], all_items: list[dict], micro_batches: int = 1) -> Any:
    """The rank's rows as its training loader, and every row in fixed batches of 8 as the scoring loader
    that per-sample detectors read at an epoch start (ranks split it by batch)."""
    import lightning as L
    from torch.utils.data import DataLoader

    class Data(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(rank_items, batch_size=len(rank_items) // micro_batches, shuffle=False)

        def scoring_loader(self, seed: int = 0) -> DataLoader:
            return DataLoader(all_items, batch_size=8, shuffle=False)

    return Data()


def _one_step(module: Any, weights: Path, name: str, stage: dict, items: list[dict], devices: int,
              all_items: list[dict], accelerator: str = "cpu") -> dict:
    """(With ``module.accum_freq`` = K the rows come as K micro-batches of one accumulated step.)"""
    """Fit one step of ``stage`` from ``weights`` on ``items``; the loss, scores, NC mask and the
    gradients as the optimizer sees them (after the DDP all-reduce)."""
    import lightning as L

    module.load_state_dict(torch.load(weights, weights_only=True))
    module.set_stage(name, stage)
    module.memory.scores = module.memory.flags = module.memory.history = None  # each stage detects afresh
    out: dict[str, Any] = {}
    update = module.detect.update

    def spy(scores: torch.Tensor, noisy: torch.Tensor, flagged: torch.Tensor) -> None:
        out["scores"], out["flagged"] = scores.detach().clone(), flagged.clone()
        update(scores, noisy, flagged)

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            out["grads"] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                            if p.requires_grad and p.grad is not None}
            out["trainable"] = sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if loss is not None:  # an accumulated step returns its loss with its last micro-batch only
                out["loss"] = loss.detach().clone()

    module.detect.update = spy
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto",
                        precision="32-true", max_epochs=1, limit_train_batches=module.accum_freq, limit_val_batches=0,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[Record()])
    # Each rank's loader yields its own rows, in order: the gathered batch is rank 0's rows then rank 1's.
    trainer.fit(module, datamodule=_data(items, all_items, module.accum_freq))
    assert trainer.global_step == 1
    del module.detect.update
    out["sample_flags"] = None if module.memory.flags is None else module.memory.flags.clone()
    return out


def _worker(rank: int, port: int, spec: dict, weights: str, batch: str, out_dir: str,
            accelerator: str = "cpu", accum_freq: int = 1) -> None:
    """One DDP rank; the environment says the processes already exist, so Lightning joins them."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD),
                       "NODE_RANK": "0", "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    all_items = torch.load(batch, weights_only=False)
    items = all_items[rank * PER_RANK:(rank + 1) * PER_RANK]
    module = _module({**spec, "optim": {**spec["optim"], "accum_freq": accum_freq}})
    results = {name: _one_step(module, Path(weights), name, stage, items, WORLD, all_items, accelerator)
               for name, stage in spec["stages"].items()}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.parametrize("method, extra", [
    ("ncu_official", ()), ("ncu", ()),
    ("ncu", ("method.detector=gmm", "method.detection.source=pass")),
    ("ncu", ("method.detector=ema",)),
    ("clip", ("method.local_loss=true",)),
], ids=["ncu_official", "ncu", "ncu-gmm-pass", "ncu-ema", "clip-local-loss"])
def test_ddp_global_batch_matches_single_process(tmp_path, method, extra):
    """ncu_official: stage 1 trains the text tower through the gathered features; ncu: the anchored t~ (each
    rank anchors its own rows before the gather) and a stage 1 that trains the prompt only; gmm / ema: the
    per-sample detectors flag the same samples (scoring pass split by batch across ranks, then summed);
    clip with open_clip's local loss: each rank's loss is over its own rows, the averaged gradients are the
    global batch's."""
    _check_ddp_matches_single_process(tmp_path, method, extra, "cpu")


@pytest.mark.parametrize("method", ["ncu", "filter"])
def test_ddp_with_two_micro_batches_per_rank_matches_one_process_with_the_whole_batch(tmp_path, method):
    """optim.accum_freq=2 on 2 processes: each rank's rows come as 2 micro-batches, the loss (NC quota, OT
    plan) is over all 4 at once and the gradients are summed across ranks once per step; the same scores,
    flags, loss and averaged gradients as one process stepping on the whole batch."""
    _check_ddp_matches_single_process(tmp_path, method, (), "cpu", accum_freq=2)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_ddp_on_two_gpus_matches_one_gpu(tmp_path):
    """The same check on 2 GPUs (NCCL): one NCU step per stage, the global batch split over the ranks."""
    _check_ddp_matches_single_process(tmp_path, "ncu", (), "gpu", rtol=1e-3)


def _check_ddp_matches_single_process(tmp_path: Path, method: str, extra: tuple, accelerator: str,
                                      rtol: float = 1e-5, accum_freq: int = 1) -> None:
    import torch.multiprocessing as mp

    spec = _spec(tmp_path, method, *extra)
    torch.manual_seed(0)
    module = _module(spec)
    weights, batch = tmp_path / "weights.pt", tmp_path / "batch.pt"
    torch.save(module.state_dict(), weights)
    items = _global_batch(module.tokenizer, WORLD * PER_RANK)
    torch.save(items, batch)

    mp.spawn(_worker, args=(_free_port(), spec, str(weights), str(batch), str(tmp_path), accelerator, accum_freq),
             nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {name: _one_step(module, weights, name, stage, items, 1, items, accelerator)
                  for name, stage in spec["stages"].items()}
    finally:
        torch.set_num_threads(threads)

    k = int(0.4 * WORLD * PER_RANK)
    per_sample = spec["method"]["detector"] != "batch"
    for name in spec["stages"]:
        ref = single[name]
        if per_sample:
            assert ref["sample_flags"] is not None and ref["sample_flags"].shape == (WORLD * PER_RANK,)
            assert torch.equal(ref["flagged"], ref["sample_flags"])  # the batch is every sample, in order
        else:
            assert int(ref["flagged"].sum()) == k
        assert set(ref["grads"]) == set(ref["trainable"]), "every trainable parameter gets a gradient (DDP needs it)"
        if name == "hn" and method == "ncu":
            assert set(ref["grads"]) == {"prompt.ctx"}
        else:
            assert any(n.startswith("model.transformer.") for n in ref["grads"])
        if name == "hn" and method == "ncu_official":
            assert "prompt.ctx" in ref["grads"] and "model.visual.proj" in ref["grads"]
            assert not any(n.startswith("model.visual.transformer.") for n in ref["grads"])
        for rank, res in enumerate(ranks):
            got = res[name]
            where = f"stage {name}, rank {rank}"
            # The NC scores and selection are over the gathered global batch, in the single-process order.
            assert got["scores"].shape == (WORLD * PER_RANK,), where
            torch.testing.assert_close(got["scores"].cpu(), ref["scores"].cpu(), rtol=rtol, atol=1e-7, msg=where)
            assert torch.equal(got["flagged"].cpu(), ref["flagged"].cpu()), where
            if per_sample:
                assert torch.equal(got["sample_flags"].cpu(), ref["sample_flags"].cpu()), where
            if not spec["method"].get("local_loss"):  # a local loss is each rank's share, not the whole
                torch.testing.assert_close(got["loss"].cpu(), ref["loss"].cpu(), rtol=rtol, atol=1e-7, msg=where)
            assert set(got["grads"]) == set(ref["grads"]), where
            for n, g in ref["grads"].items():
                assert g.abs().max() > 0, f"{where}: {n} has a zero gradient"
                torch.testing.assert_close(got["grads"][n].cpu(), g.cpu(), rtol=max(1e-4, rtol),
                                           atol=max(1e-4, rtol) * float(g.abs().max()),
                                           msg=f"{where}: gradient of {n}")



EVAL_ARGS = ["experiment=smoke", "method=clip", "logger=none", "print_table=false", "data.limit=385"]


def _eval_worker(rank: int, port: int, data_dir: str, weights: str, out_dir: str) -> None:
    """One rank of a DDP test pass over an odd-sized test split (the sampler pads one rank with a repeat)."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD),
                       "NODE_RANK": "0", "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    out = _test_pass(Path(out_dir) / f"r{rank}", Path(data_dir), Path(weights), WORLD)
    torch.save(out, Path(out_dir) / f"eval{rank}.pt")


def _test_pass(tmp: Path, data_dir: Path, weights: Path, devices: int) -> dict[str, float]:
    import lightning as L

    from ncu.run import build, test_metrics

    cfg = compose_cfg(EVAL_ARGS, tmp_path=tmp, data_dir=data_dir)
    _, dm, module = build(cfg)
    module.load_state_dict(torch.load(weights, weights_only=True))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    return {**test_metrics(trainer, module, dm, "test"), "n": float(len(dm.datasets["test"]))}


def test_ddp_test_pass_scores_each_test_pair_once_as_one_process(tmp_path):
    """Retrieval and zero-shot over the gathered features with the sampler's padding removed: the same
    numbers as one process, on a split the ranks cannot share evenly."""
    import torch.multiprocessing as mp

    from ncu.run import build

    torch.manual_seed(0)
    _, _, module = build(compose_cfg(EVAL_ARGS, tmp_path=tmp_path / "init", data_dir=tmp_path / "data"))
    weights = tmp_path / "weights.pt"
    torch.save(module.state_dict(), weights)
    single = _test_pass(tmp_path / "single", tmp_path / "data", weights, 1)
    assert single["n"] % WORLD == 1  # one rank gets a padded repeat
    mp.spawn(_eval_worker, args=(_free_port(), str(tmp_path / "data"), str(weights), str(tmp_path)), nprocs=WORLD,
             join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"eval{rank}.pt", weights_only=False)
        for key in ("test/i2t_R@1", "test/t2i_R@1", "test/rsum", "test/zeroshot_top1"):
            assert got[key] == pytest.approx(single[key], abs=1e-6), (rank, key)
