"""Train: pre-train (when no weights are given), then the method's stages; evaluate before and after.

    python train.py                                   # the main job on the embedded real data
    python train.py experiment=smoke                  # a tiny end-to-end run
    python train.py -m noise.rate=0.2,0.4 method=clip # a sweep
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

# Light imports only: a bad value is reported before torch, open_clip and lightning load.
from ncu import resume
from ncu.config import InputError, validate
from ncu.files import discard_unused_output


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        validate(cfg)
        resume.check(cfg, Path(cfg.paths.output_dir))
        from ncu.run import train

        metrics, _ = train(cfg)
    except (InputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        if not cfg.get("resume"):
            discard_unused_output(cfg.paths.output_dir)
        sys.exit(2)
    return metrics.get("val/rsum")


if __name__ == "__main__":
    main()
