"""Shard lists: brace ranges and lists (the ``braceexpand`` package webdataset uses), ``::``/comma lists and
local globs expanded to shard paths or URLs (no heavy imports: start-up checks use it)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from glob import glob

from braceexpand import braceexpand


def _split_top(spec: str) -> list[str]:
    """Split on ``::`` and ``,`` outside braces."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(spec):
        ch = spec[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if depth == 0 and (spec.startswith("::", i) or ch == ","):
            parts.append("".join(cur))
            cur = []
            i += 2 if ch == ":" else 1
            continue
        cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def is_url(shard: str) -> bool:
    """A shard webdataset opens by URL (``pipe:<command>``, ``https://``, ``s3://`` ...), not a local file."""
    return shard.startswith("pipe:") or "://" in shard


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard paths or URLs from ``data/{00000..00012}.tar`` (padding kept), ``{a,b}`` lists, ``::``- or
    comma-separated lists, and local glob patterns (``*``, ``?``, sorted). A list is expanded item by item.
    ``pipe:curl -s https://host/cc3m/{00000..00331}.tar`` gives one ``pipe:`` command per shard."""
    if not isinstance(spec, str):
        return [p for s in spec for p in expand_shards(s)]
    out: list[str] = []
    for part in _split_top(spec):
        for path in braceexpand(part):
            if not is_url(path) and any(c in path for c in "*?[") and not os.path.exists(path):
                out.extend(sorted(glob(path)))
            else:
                out.append(path)
    return out
