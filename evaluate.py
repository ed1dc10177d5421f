"""Evaluate a training run's checkpoint, or a pre-trained model, on a benchmark suite (conf/benchmark/).

    python evaluate.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt            # benchmark=embedded
    python evaluate.py ckpt_path=<ckpt> benchmark=imagenet benchmark.tasks.imagenet.data=/data/imagenet/val
    python evaluate.py ckpt_path=pretrained model=vit_b16 model.pretrained=openai
    python evaluate.py -m ckpt_path=<a.ckpt>,<b.ckpt>

Results: <run_dir>/eval/<date>_<benchmark>/metrics.json and a printed table (see ncu/eval/suite.py).
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

# Light imports only before the checks; ncu.config also registers the ncu_run_dir resolver of conf/evaluate.yaml.
from ncu.cli import refuse
from ncu.config import InputError, validate_eval
from ncu.files import storage_error


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        validate_eval(cfg)
        from ncu.eval.suite import evaluate

        evaluate(cfg)
    except (InputError, FileNotFoundError) as e:
        refuse(cfg.paths.output_dir, e)
    except OSError as e:  # a full, read-only or forbidden disk: one line naming the path and the free space
        failed = storage_error(e)
        if failed is None:
            raise
        refuse(cfg.paths.output_dir, failed)


if __name__ == "__main__":
    main()
