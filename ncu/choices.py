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

# Options added after caches keyed on their section (pre-trainings, noise artifacts, scene sets) existed: unset
# (null) they change nothing, so cache keys leave them out and the caches made before them stay valid.
UNSET_IN_KEYS = {"model": ("logit_scale",), "data": ("train_size",)}


def cache_key_view(section: str, values: dict) -> dict:
    """``values`` of a config section as cache keys hash it: the options of ``UNSET_IN_KEYS`` left out when null."""
    return {k: v for k, v in values.items() if not (k in UNSET_IN_KEYS.get(section, ()) and v is None)}
