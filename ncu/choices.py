"""The names a config may choose from, kept free of heavy imports so that start-up checks are fast."""
from __future__ import annotations

DETECTORS = ("batch", "oracle", "gmm", "ema")
DETECTION_SOURCES = ("running", "pass")
DETECTION_CUTS = ("gmm", "quota")
ANCHORS = ("none", "band")
NEGATION_HEADS = ("none", "rotation")
NEGATION_MODES = ("none", "prompt", "template")
# Stage 2: how flagged captions enter the targets, and the capacity of the hardest-negative column.
FLAGGED_CAPTIONS = ("target", "negative", "drop")
HN_CAPACITIES = ("uniform", "flagged")
NOISE_PROTOCOLS = ("none", "caption", "image", "random_replace", "semantic", "concept")
# Sinkhorn stopping rule: the max relative row-marginal error (ours) or the L1 change of the row duals (official).
SINKHORN_STOPS = ("marginal", "dual_l1")
# Pairs flagged per batch: floor(rho * N) with a 1e-9 slack against float rounding (ours) or Python's
# int(rho * N) as the official code computes it (0.29 * 100 gives 28).
NC_COUNTS = ("floor", "truncate")
# Other emoji styles of the test data (data.shifts; ncu/data/styles.py): zero-shot transfer under distribution shift.
SHIFT_STYLES = ("openmoji", "noto", "sketch")

# Options added after caches keyed on their section (pre-trainings, noise artifacts, scene sets) and run folders
# existed, each with the value that behaves as before it existed: at that value cache keys leave it out and a
# resume takes it as absent, so the caches and run folders made before it stay valid. "stage" is a stage's
# settings (optim.stage_defaults and a stage's own keys).
ADDED_LATER = {
    "model": {"logit_scale": None},
    "data": {"train_size": None},
    "stage": {"detector": None, "flag_after": 0, "detection": {}},
    "optim": {"accum_freq": 1},
    "method": {"local_loss": False, "detection": {"threshold": 0.5, "source": "running", "momentum": 0.9,
                                                  "cut": "gmm"}},
}


def added_later_flat() -> dict:
    """``ADDED_LATER`` as dotted keys of a run config, ``{"model.logit_scale": None, ...}``."""
    out = {}
    for section, options in ADDED_LATER.items():
        prefix = "optim.stage_defaults" if section == "stage" else section
        for key, value in options.items():
            if isinstance(value, dict) and value:
                out.update({f"{prefix}.{key}.{k}": v for k, v in value.items()})
            else:
                out[f"{prefix}.{key}"] = value
    return out


def cache_key_view(section: str, values: dict) -> dict:
    """``values`` of a config section as cache keys hash it: the options of ``ADDED_LATER`` left out at their
    earlier value."""
    later = ADDED_LATER.get(section, {})
    return {k: v for k, v in values.items() if not (k in later and v == later[k])}
