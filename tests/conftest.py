"""Compose the real configs (Hydra compose API) with test-sized overrides."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ncu.config import compose_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
os.environ.setdefault("WANDB_MODE", "offline")

# A CPU-sized run on the real embedded pairs: micro model, a few hundred pairs, short stages.
# The shifted styles (data.shifts) are left to the tests that score them.
FAST = ["experiment=smoke", "logger=none", "trainer.enable_progress_bar=false", "print_table=false", "data.shifts=[]"]


def compose_cfg(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train",
                tmp_path: Path | None = None, data_dir: Path | None = None) -> DictConfig:
    cfg = compose_config(overrides, config_name, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = str(ROOT)
        if tmp_path is not None:
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
            cfg.paths.data_dir = str(data_dir or tmp_path / "data")
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str, fast: bool = True, config_name: str = "train") -> DictConfig:
        return compose_cfg((FAST if fast else []) + list(overrides), config_name, tmp_path)

    return _make


def assert_figure(path: Path, min_side: int = 200) -> None:
    """``path`` is a PNG that decodes to a figure of at least ``min_side`` pixels a side with something drawn
    on it (more than a handful of colours), not merely a file that exists."""
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side, (path, im.format, im.size)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 8, f"{path}: a blank figure"
