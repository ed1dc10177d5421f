"""Shard lists: brace ranges, lists and globs expanded to paths (no heavy imports: start-up checks use it)."""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from glob import glob

_BRACE = re.compile(r"\{([^{}]*)\}")


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


def _brace_items(body: str) -> list[str]:
    m = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?", body)
    if m is None:
        return body.split(",")  # {a,b,c}
    a, b, step = m.group(1), m.group(2), int(m.group(3) or 1)
    lo, hi = int(a), int(b)
    # Zero padding is kept when either bound is written with a leading zero ({00000..00012}).
    padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-")[0] == "0" for x in (a, b))
    width = max(len(a), len(b)) if padded else 0
    values = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
    return [str(v).zfill(width) for v in values]


def _expand_one(pattern: str) -> list[str]:
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [x for item in _brace_items(m.group(1)) for x in _expand_one(head + item + tail)]


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard paths from ``data/{00000..00012}.tar`` (padding kept), ``{a,b}`` lists, ``::``- or
    comma-separated lists, and glob patterns (``*``, ``?``, sorted). A list is expanded item by item."""
    if not isinstance(spec, str):
        return [p for s in spec for p in expand_shards(s)]
    out: list[str] = []
    for part in _split_top(spec):
        for path in _expand_one(part):
            if any(c in path for c in "*?[") and not os.path.exists(path):
                out.extend(sorted(glob(path)))
            else:
                out.append(path)
    return out
