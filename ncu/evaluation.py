"""evaluate(cfg): re-evaluate a training run's checkpoint with the run's own saved config."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from ncu.config import ConfigError
from ncu.run import HEADLINE, build, test_metrics, write_json

def load_run_config(ckpt_path: str) -> DictConfig:
    """The resolved config a checkpoint was trained with (stored in its hyper-parameters)."""
    import torch

    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path not found: {ckpt_path}")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    config = (ckpt.get("hyper_parameters") or {}).get("config")
    if not config:
        raise ConfigError(f"{ckpt_path} carries no run config: was it written by train.py?")
    return OmegaConf.create(config)


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    run_cfg = load_run_config(cfg.ckpt_path)
    run_cfg = OmegaConf.merge(run_cfg, cfg.get("run_overrides") or {})
    run_cfg.model.pretrained = str(Path(cfg.ckpt_path).resolve())
    out_dir = Path(cfg.paths.output_dir)
    _, dm, module = build(run_cfg)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        **OmegaConf.to_container(cfg.trainer, resolve=True))
    metrics = test_metrics(trainer, module, dm, "test")
    write_json(out_dir / "metrics.json", {**metrics, "ckpt_path": cfg.ckpt_path})
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"test split: {cfg.ckpt_path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in HEADLINE:
        if f"test/{key}" in metrics:
            table.add_row(key, f"{metrics[f'test/{key}']:.2f}")
    Console().print(table)
    return metrics, {"module": module, "datamodule": dm, "out_dir": out_dir}
