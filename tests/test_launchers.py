"""Launcher and multi-GPU trainer configs: they compose, and what they hand to submitit/joblib/Lightning is valid.

SLURM cannot run here: the launcher config is turned into the sbatch script submitit would submit and
that script is checked line by line.
"""
from __future__ import annotations

import dataclasses
import inspect
import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from conftest import ROOT, compose_cfg
from ncu.config import compose_config


def compose_with_hydra(overrides: list[str], tmp_path: Path) -> DictConfig:
    """The train config with its ``hydra`` node kept (compose_cfg drops it), as a multirun would see it."""
    cfg = compose_config(overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = str(ROOT)
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.job.name = "train"
        cfg.paths.log_dir = str(tmp_path / "logs")
    HydraConfig.instance().set_config(cfg)
    return cfg


def sbatch_script(launcher_cfg: DictConfig, folder: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Any]:
    """The sbatch file submitit writes for this launcher config, and the executor.

    Parameters travel as hydra-submitit-launcher 1.2.0 passes them: ``max_num_timeout`` to the executor,
    the generic queue keys as they are, every other key with the ``slurm_`` prefix."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # no srun on this machine

    params = dict(instantiate(launcher_cfg).params)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    generic = {f.name for f in dataclasses.fields(BaseQueueConf)}
    executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid"), executor


def test_slurm_launcher_composes_into_a_valid_sbatch_script(tmp_path, monkeypatch):
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    cfg = compose_with_hydra(["hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.gpus_per_node=8",
                              "trainer.devices=8", "resume=auto"], tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert set(launcher) <= {f.name for f in dataclasses.fields(SlurmQueueConf)}
    # One task per GPU: Lightning takes the ranks from SLURM, and its devices must equal the tasks per node.
    assert launcher.gpus_per_node == launcher.tasks_per_node == cfg.trainer.devices == 8
    assert launcher.partition is None
    assert launcher.max_num_timeout >= 1 and cfg.resume == "auto"
    assert str(launcher.submitit_folder).startswith(str(cfg.hydra.sweep.dir))

    text, executor = sbatch_script(launcher, tmp_path / "submitit", monkeypatch)
    lines = set(text.splitlines())
    for flag in ("--gpus-per-node=8", "--ntasks-per-node=8", "--nodes=1", "--requeue",
                 f"--cpus-per-task={launcher.cpus_per_task}", f"--time={launcher.timeout_min}",
                 f"--mem={launcher.mem_gb}GB", "--job-name=train"):
        assert f"#SBATCH {flag}" in lines, flag
    assert not any(line.startswith("#SBATCH --partition") for line in lines)
    assert any(line.startswith("#SBATCH --signal=") and line.endswith(f"@{launcher.signal_delay_s}") for line in lines)
    assert executor._executor.max_num_timeout == launcher.max_num_timeout


def test_slurm_tasks_follow_gpus_per_node(tmp_path, monkeypatch):
    cfg = compose_with_hydra(["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"], tmp_path)
    text, _ = sbatch_script(cfg.hydra.launcher, tmp_path / "submitit", monkeypatch)
    assert "#SBATCH --ntasks-per-node=4" in text.splitlines()


def test_local_gpus_launcher_composes(tmp_path, monkeypatch):
    monkeypatch.setenv("NCU_N_GPUS", "4")
    cfg = compose_with_hydra(["hydra/launcher=local_gpus"], tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert launcher.n_jobs == 4
    assert int(launcher.batch_size) == 1
    # Resolved in each joblib worker (not here): the worker's own GPU.
    env = OmegaConf.to_container(cfg.hydra.job.env_set, resolve=False)
    assert env["CUDA_VISIBLE_DEVICES"].startswith("${ncu_gpu_for_job:")
    # The trainer is untouched: one device per job, never DDP inside a local sweep.
    assert cfg.trainer.devices == 1 and cfg.trainer.get("strategy") is None


def _trainer_kwargs(trainer_cfg: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(trainer_cfg, resolve=True).items() if k != "_target_"}


@pytest.mark.parametrize("name", ["ddp", "ddp_cpu"])
def test_ddp_trainer_configs_are_trainer_arguments(name, tmp_path, monkeypatch):
    import lightning

    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    cfg = compose_cfg(["experiment=smoke", f"trainer={name}"], tmp_path=tmp_path)
    kwargs = _trainer_kwargs(cfg.trainer)
    assert cfg.trainer._target_ == "lightning.Trainer"
    assert set(kwargs) <= set(inspect.signature(lightning.Trainer.__init__).parameters)
    assert kwargs["strategy"] == "ddp" and kwargs["num_nodes"] == 1
    if name == "ddp":
        assert (kwargs["accelerator"], kwargs["devices"], kwargs["precision"]) == ("gpu", "auto", "bf16-mixed")
    else:
        assert (kwargs["accelerator"], kwargs["devices"], kwargs["precision"]) == ("cpu", 2, "32-true")


def test_ddp_devices_follow_slurm_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    cfg = compose_cfg(["trainer=ddp"], tmp_path=tmp_path)
    assert cfg.trainer.devices == 8


def test_ddp_cpu_trainer_instantiates(tmp_path):
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    cfg = compose_cfg(["experiment=smoke", "trainer=ddp_cpu"], tmp_path=tmp_path)
    trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.num_devices == 2 and trainer.world_size == 2
    # "ddp" re-runs the command line per extra process (at fit time), as on GPUs; ddp_spawn would not.
    assert type(trainer.strategy.launcher).__name__ == "_SubprocessScriptLauncher"


# ----- ncu_gpu_for_job: one GPU per sweep worker -------------------------------------------------------

def _claim(n_gpus: int, visible: str | None, out: Any, release: Any) -> None:
    """A sweep worker: resolve the job's CUDA_VISIBLE_DEVICES, report it, hold it until released."""
    import os

    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    import ncu.config  # noqa: F401 - registers the resolver

    try:
        cfg = OmegaConf.create({"gpu": f"${{ncu_gpu_for_job:{n_gpus}}}", "again": f"${{ncu_gpu_for_job:{n_gpus}}}"})
        gpu = cfg.gpu
        out.put(("ok", gpu, cfg.again))
    except Exception as e:  # noqa: BLE001 - reported to the test
        out.put(("error", type(e).__name__, str(e)))
        return
    release.wait(20)


def _start(ctx: Any, n: int, visible: str | None, out: Any, release: Any) -> tuple[Any, tuple]:
    proc = ctx.Process(target=_claim, args=(n, visible, out, release))
    proc.start()
    return proc, out.get(timeout=30)


def test_gpu_for_job_gives_each_worker_its_own_gpu():
    ctx = mp.get_context("spawn")
    out, release = ctx.Queue(), ctx.Event()
    procs = []
    try:
        first, a = _start(ctx, 2, None, out, release)
        second, b = _start(ctx, 2, None, out, release)
        procs += [first, second]
        assert a[0] == b[0] == "ok"
        assert {a[1], b[1]} == {"0", "1"} and a[1] == a[2] and b[1] == b[2]  # stable within a worker
        third, c = _start(ctx, 2, None, out, release)  # more workers than GPUs: refused, not doubled up
        procs.append(third)
        assert c[0] == "error"
    finally:
        release.set()
        for p in procs:
            p.join(20)
    # The claims end with the workers; a restricted CUDA_VISIBLE_DEVICES maps index i to its i-th entry.
    release = ctx.Event()
    try:
        fourth, d = _start(ctx, 2, "5,7", out, release)
        assert d[:2] == ("ok", "5")
    finally:
        release.set()
        fourth.join(20)


def test_optuna_lr_sweep_composes_with_log_search_spaces(tmp_path):
    cfg = compose_config(["sweep=optuna_lr"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"method.stages.hn.lr", "method.stages.hn.groups.prompt.lr",
                                   "method.stages.unlearn.lr"}
    assert all(str(v).startswith("tag(log") for v in sweeper.params.values())
