"""Printing benchmark results: aligned plain-text tables."""
from __future__ import annotations


def table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    width = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(width[c]) for c in cols)]
    lines += ["  ".join(fmt(r.get(c, "")).rjust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)
