"""``resume=auto``: what a previous attempt of a run finished, and whether this command may continue it."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ncu.choices import added_later_flat
from ncu.errors import ConfigError
from ncu.files import atomic_path

log = logging.getLogger(__name__)
RUN_CONFIG = "run_config.json"
# Keys that change how a run executes or reports, not its numbers: a resume may change them.
FREE_KEYS = ("resume", "checkpoint", "train_eval", "logger", "paths", "hydra", "callbacks", "print_table", "task_name", "experiment_name",
             "tags", "trust_checkpoints", "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.accelerator",
             "trainer.default_root_dir",
             "trainer.enable_progress_bar", "trainer.log_every_n_steps", "trainer.enable_model_summary",
             "data.num_workers", "data.eval_batch_size", "data.index_cache", "data.cache_dir",
             "data.shifts", "model.grad_checkpointing", "model.compile")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` of nested dicts (lists are leaves)."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _free(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in FREE_KEYS)


def changed_keys(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose value differs between two resolved configs, those in ``FREE_KEYS`` left out. An
    option added later (``ADDED_LATER``) that one config lacks and the other holds at its earlier value is
    unchanged."""
    a, b = flatten(saved), flatten(current)
    later = added_later_flat()

    def value(tree: dict, key: str) -> Any:
        return tree.get(key, later.get(key, "<absent>"))

    return sorted(k for k in set(a) | set(b) if not _free(k) and value(a, k) != value(b, k))


def read_progress(run_dir: Path) -> dict[str, Any]:
    """Stages a previous attempt of this run finished (``progress.json``), for ``resume=auto``."""
    path = run_dir / "progress.json"
    if not path.exists():
        return {"completed": [], "metrics": {}, "step": 0}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise ConfigError(f"resume=auto: {path} is unreadable; remove it to start the run again") from None


def resolved(cfg: DictConfig) -> dict:
    return json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str))


def check(cfg: DictConfig, run_dir: Path) -> None:
    """With ``resume=auto``: refuse a run folder whose recorded config differs from ``cfg`` in anything that
    changes results, naming the keys."""
    saved_path = run_dir / RUN_CONFIG
    if cfg.get("resume") != "auto" or not saved_path.exists():
        return
    changed = changed_keys(json.loads(saved_path.read_text()), resolved(cfg))
    if changed:
        raise ConfigError(f"resume=auto: {run_dir} was made with another config ({shown(changed)}); "
                          "resume with the same values or start a new run folder")


def shown(changed: list[str]) -> str:
    """``"a, b differ"``: the first changed keys, for a refusal."""
    text = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
    return f"{text} {'differs' if len(changed) == 1 else 'differ'}"


def start(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The progress this run continues from (nothing unless ``resume=auto``), after :func:`check`."""
    check(cfg, run_dir)
    if cfg.get("resume") != "auto":
        return {"completed": [], "metrics": {}, "step": 0}
    progress = read_progress(run_dir)
    if progress["completed"] and not (run_dir / RUN_CONFIG).exists():
        log.warning("resume=auto: %s has no %s (made by an older version): its config is not checked",
                    run_dir, RUN_CONFIG)
    return progress


def record(cfg: DictConfig, run_dir: Path) -> None:
    """Keep the run's resolved config in its folder (written once the run is built), for a later resume."""
    with atomic_path(run_dir / RUN_CONFIG) as tmp:
        tmp.write_text(json.dumps(resolved(cfg), indent=2, sort_keys=True))
