"""The names a config may choose from, kept free of heavy imports so that start-up checks are fast."""
from __future__ import annotations

OBJECTIVES = ("clip", "filter", "grad_ascent", "ncu_hn", "ncu_unlearn")
DETECTORS = ("batch", "oracle", "gmm", "ema")
# Objectives that use the flags (the others only measure them).
FLAG_OBJECTIVES = ("filter", "grad_ascent", "ncu_hn", "ncu_unlearn")
DETECTION_SOURCES = ("running", "pass")
DETECTION_CUTS = ("gmm", "quota")
ANCHORS = ("none", "band")
NEGATION_HEADS = ("none", "rotation")
NEGATION_MODES = ("none", "prompt", "template")
# Stage 2: how flagged captions enter the targets, and the capacity of the hardest-negative column.
FLAGGED_CAPTIONS = ("target", "negative", "drop")
HN_CAPACITIES = ("uniform", "flagged")
NOISE_PROTOCOLS = ("none", "caption", "image", "random_replace", "semantic")
