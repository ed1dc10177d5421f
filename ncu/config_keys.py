"""The keys a config may add on the command line (``+key=value``, ``++key=value``): those some file under
``conf/`` defines, or those in an open section; any other is a typo, refused naming the nearest known key.
YAML only: no Hydra compose."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ncu.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# Added keys (`+key=value`, `++key=value`) that no file under conf/ has to define, as dotted patterns: `*` is
# one name, `**` the rest of the key. Every other added key must be one that some option of its config group
# defines, else it is refused as a typo. To open another section (a new open-ended set of kwargs), add its
# pattern here.
STAGE_SETTINGS = ("objective", "epochs", "lr", "weight_decay", "warmup", "min_lr_ratio", "train", "freeze",
                  "unfreeze", "freeze_text_blocks", "freeze_token_embedding", "groups", "clamp_logit_scale",
                  "detector", "flag_after", "detection")
OPEN_SECTIONS = (
    "hydra.**",  # Hydra's own settings
    "trainer.**",  # Lightning Trainer kwargs are open-ended
    "logger.**",
    "callbacks.**",
    "benchmark.tasks.**",  # evaluate.py: a new task, or a task's own settings
    "train_eval.tasks.**",  # train.py: a task scored during training
    "method.stages.*",  # a new stage
    *(f"method.stages.*.{key}" for key in STAGE_SETTINGS),  # the stage settings the code reads
    "method.stages.*.groups.**",  # extra optimizer groups: {name: {params, lr, weight_decay}}
)
# evaluate.py's run keys (merged on top of the run's config): checked as the train.py keys they name.
RUN_KEY_PREFIXES = ("run_overrides.", "run_defaults.")


def _matches(key: str, pattern: str) -> bool:
    parts, want = key.split("."), pattern.split(".")
    if want[-1] == "**":
        return len(parts) >= len(want) and all(w in ("*", p) for w, p in zip(want[:-1], parts))
    return len(parts) == len(want) and all(w in ("*", p) for w, p in zip(want, parts))


def _flat_keys(tree: Any, prefix: str) -> set[str]:
    if not isinstance(tree, dict):
        return set()
    out = set()
    for key, value in tree.items():
        if key == "defaults":
            continue
        dotted = f"{prefix}.{key}" if prefix else str(key)
        out |= {dotted} | _flat_keys(value, dotted)
    return out


def _stage_prefix(key: str) -> str | None:
    """The part of ``key`` that names a stage (``method.stages.hn``, ``pretrain.stage``,
    ``optim.stage_defaults``), None for other keys: every stage takes the same settings."""
    parts = key.split(".")
    if parts[:2] == ["method", "stages"] and len(parts) > 3:
        return ".".join(parts[:3])
    if parts[:2] in (["pretrain", "stage"], ["optim", "stage_defaults"]) and len(parts) > 2:
        return ".".join(parts[:2])
    return None


def _generic_stage(key: str) -> str:
    """``method.stages.hn.lr``, ``pretrain.stage.lr`` and ``optim.stage_defaults.lr`` -> ``method.stages.*.lr``."""
    prefix = _stage_prefix(key)
    return f"method.stages.*{key[len(prefix):]}" if prefix else key


def _read_yaml(path: Path) -> tuple[dict, str | None]:
    """A config file's content and its ``# @package`` header (None without one)."""
    import yaml

    text = path.read_text()
    header = next((line.split("@package", 1)[1].strip() for line in text.splitlines()[:10]
                   if line.lstrip().startswith("#") and "@package" in line), None)
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}, header
    return (tree if isinstance(tree, dict) else {}), header


def _groups_of(tree: dict, here: str) -> list[tuple[str, str | None]]:
    """``[(group, package)]`` of a defaults list (group relative to ``here``, the file's group folder)."""
    out = []
    for entry in tree.get("defaults") or []:
        if not isinstance(entry, dict):
            continue  # _self_, or a config of the same group
        for spec in entry:
            words = str(spec).split()
            if not words or (len(words) == 2 and words[0] not in ("override", "optional")):
                continue
            group, _, package = words[-1].partition("@")
            group = group.lstrip("/") if group.startswith("/") else "/".join(p for p in (here, group) if p)
            out.append((group, package or None))
    return out


def _package_prefix(package: str | None, header: str | None, group: str) -> str:
    """Where an option's keys land: the defaults entry's ``@package`` over the file's header over the group."""
    chosen = package if package is not None else header
    if chosen is None or chosen == "_group_":
        return group.replace("/", ".")
    return chosen.removeprefix("_global_").lstrip(".")


@functools.lru_cache(maxsize=None)
def known_keys(config_name: str | None = "train") -> frozenset[str]:
    """Every dotted key that a config of the primary ``config_name`` (``train``, ``evaluate``; None: every file
    under conf/) may define: its own keys and those of every option of the groups its defaults lists name, at
    the place they land. Stage keys are generic (``method.stages.*.lr``). YAML only: no Hydra compose."""
    keys: set[str] = set()
    if config_name is None:
        for path in CONF_DIR.rglob("*.yaml"):
            tree, header = _read_yaml(path)
            group = path.parent.relative_to(CONF_DIR).as_posix()
            keys |= _flat_keys(tree, "" if group == "." else _package_prefix(None, header, group))
        return frozenset(_generic_stage(k) for k in keys)
    tree, _ = _read_yaml(CONF_DIR / f"{config_name}.yaml")
    keys |= _flat_keys(tree, "")
    todo, seen = _groups_of(tree, ""), set()
    while todo:
        group, package = todo.pop()
        if (group, package) in seen or not (CONF_DIR / group).is_dir():
            continue  # Hydra's own groups (hydra/job_logging) are not under conf/
        seen.add((group, package))
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            option, header = _read_yaml(path)
            keys |= _flat_keys(option, _package_prefix(package, header, group))
            todo += _groups_of(option, group)
    return frozenset(_generic_stage(k) for k in keys)


def _open_sections(config_name: str | None) -> list[str]:
    """The patterns of :data:`OPEN_SECTIONS` that apply to a config: a section below the top level
    (``method.stages``, ``benchmark.tasks``) only where that config has it (evaluate.py has no stages)."""
    known = known_keys(config_name)
    out = []
    for pattern in OPEN_SECTIONS:
        fixed = pattern.split(".*")[0]
        if "." not in fixed or fixed in known:
            out.append(pattern)
    return out


def _is_known(key: str, config_name: str | None) -> bool:
    checked = _generic_stage(key)
    return any(_matches(checked, p) for p in _open_sections(config_name)) or checked in known_keys(config_name)


def _nearest(key: str, config_name: str | None) -> str | None:
    """The known key closest to ``key`` (difflib), in the user's spelling of a stage (``method.stages.hn.*``)."""
    import difflib

    named = {p for p in _open_sections(config_name) if "*" not in p.split(".")[-1]}  # e.g. method.stages.*.lr
    candidates = known_keys(config_name) | named
    close = difflib.get_close_matches(_generic_stage(key), sorted(candidates), n=1, cutoff=0.75)
    if not close:
        return None
    stage = _stage_prefix(key)
    if stage and close[0].startswith("method.stages.*."):
        return stage + close[0][len("method.stages.*"):]
    return close[0]


def unknown_added_key(key: str, config_name: str | None = "train", sign: str = "+") -> str | None:
    """The message for a key that a ``+``/``++`` override adds to the ``config_name`` config and that no config
    defines nor :data:`OPEN_SECTIONS` opens (a typo), else None."""
    prefix = next((p for p in RUN_KEY_PREFIXES if key.startswith(p)), "")
    if prefix:  # evaluate.py's run_overrides.<key>: a train.py key
        inner, scope = key[len(prefix):], "train"
    else:
        inner, scope = key, config_name
    if _is_known(inner, scope):
        return None
    near = _nearest(inner, scope)
    near = prefix + near if near else None
    if near is None and not prefix and "run_overrides" in known_keys(config_name):
        # evaluate.py given a train.py key: it belongs under run_overrides
        run_key = inner if _is_known(inner, "train") else _nearest(inner, "train")
        near = f"run_overrides.{run_key}" if run_key else None
    where = "no config under conf/" if scope in (None, "train") else f"no config of {scope}.py"
    hint = f" (did you mean {near}?)" if near else ""
    return (f"{sign}{key}: {where} defines {inner}{hint}; an added key must be one that a file of its config "
            "group defines, or lie in an open section (ncu/config_keys.py: OPEN_SECTIONS, where a new one is added)")


def _present(cfg: DictConfig, key: str) -> bool:
    node: Any = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_added_keys(cfg: DictConfig | None = None) -> None:
    """Refuse ``+key=value`` / ``++key=value`` overrides of the command line (Hydra's record of them) that name
    no known key. With ``cfg``, overrides whose key ``cfg`` lacks are ignored: they belong to another
    composition (Hydra's record outlives it in a process that composes several configs, such as the tests)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    task = list(hydra_cfg.overrides.task)
    if not any(o.lstrip().startswith("+") for o in task):
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser

    config_name = hydra_cfg.job.get("config_name")
    config_name = config_name if config_name and (CONF_DIR / f"{config_name}.yaml").is_file() else None
    for override in OverridesParser.create().parse_overrides(task):
        if not (override.is_add() or override.is_force_add()):
            continue
        key = override.key_or_group
        # A config group selection (+experiment=smoke, +hydra/launcher=slurm, +data@x=csv), not a key.
        if "/" in key or override.package is not None or ("." not in key and (CONF_DIR / key).is_dir()):
            continue
        if cfg is not None and not key.startswith("hydra.") and not _present(cfg, key):
            continue
        message = unknown_added_key(key, config_name, "++" if override.is_force_add() else "+")
        if message:
            raise ConfigError(message)
