"""Train: pre-train (when no weights are given), then the method's stages; evaluate before and after.

    python train.py                                   # the main job on the embedded real data
    python train.py experiment=smoke                  # a tiny end-to-end run
    python train.py -m noise.rate=0.2,0.4 method=clip # a sweep
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ncu.config import ConfigError


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from ncu.run import train

    try:
        metrics, _ = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return metrics.get("val/rsum")


if __name__ == "__main__":
    main()
