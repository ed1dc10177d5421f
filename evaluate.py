"""Evaluate a checkpoint of a training run with that run's own config (architecture, preprocessing, data).

    python evaluate.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python evaluate.py -m ckpt_path=<a.ckpt>,<b.ckpt>
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ncu.config import ConfigError  # also registers the ncu_run_dir resolver used by conf/evaluate.yaml


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from ncu.evaluation import evaluate

    try:
        evaluate(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
