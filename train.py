"""Train: pre-train (when no weights are given), then the method's stages; evaluate before and after.

    python train.py                                   # the main job on the embedded real data
    python train.py experiment=smoke                  # a tiny end-to-end run
    python train.py -m noise.rate=0.2,0.4 method=clip # a sweep
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

# Light imports only: a bad value is reported before torch, open_clip and lightning load.
from ncu import resume
from ncu.cli import refuse
from ncu.config import InputError, validate
from ncu.files import storage_error


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        validate(cfg)
        resume.check(cfg, Path(cfg.paths.output_dir))
        from ncu.run import train

        metrics, _ = train(cfg)
    except (InputError, FileNotFoundError) as e:
        return refuse(cfg.paths.output_dir, e, keep_output=bool(cfg.get("resume")))
    except OSError as e:  # a full, read-only or forbidden disk: one line naming the path and the free space
        failed = storage_error(e)
        if failed is None:
            raise
        return refuse(cfg.paths.output_dir, failed, keep_output=bool(cfg.get("resume")))
    return metrics.get("val/rsum")


if __name__ == "__main__":
    main()
