"""Additive step metrics (counts, histogram bins, sums): computed per output part and summed over parts."""
from __future__ import annotations

import json
import re

import pandas as pd


def family_counts(df: pd.DataFrame) -> dict[str, float]:
    """Per seed family: rows in this output and rows kept (additive, so they sum over parts)."""
    out: dict[str, float] = {}
    for fam, g in df.groupby("family"):
        fam = re.sub(r"[^\w\-]", "_", str(fam))  # a metric-name-safe family name
        out[f"family.{fam}.rows"] = out.get(f"family.{fam}.rows", 0.0) + float(len(g))
        out[f"family.{fam}.kept"] = out.get(f"family.{fam}.kept", 0.0) + float(g["reason"].isna().sum())
    return out


def count_values(df: pd.DataFrame, column: str, prefix: str) -> dict[str, float]:
    """``<prefix>.<item>`` counts over a column of JSON lists."""
    out: dict[str, float] = {}
    for cell in df[column].dropna():
        for item in json.loads(cell):
            key = f"{prefix}.{item}"
            out[key] = out.get(key, 0.0) + 1.0
    return out


_BINS = [i / 10 for i in range(11)]


def histogram(values: list[float], name: str) -> dict[str, float]:
    """Ten bins over [0, 1] plus sum and count (so a mean can be derived from the totals)."""
    out = {f"{name}.bin_{lo:.1f}": 0.0 for lo in _BINS[:-1]}
    for v in values:
        lo = min(int(v * 10), 9) / 10
        out[f"{name}.bin_{lo:.1f}"] += 1.0
    out[f"{name}.sum"] = float(sum(values))
    out[f"{name}.count"] = float(len(values))
    return out


def means(totals: dict[str, float], names: tuple[str, ...]) -> dict[str, float]:
    """``<name>.mean`` from the summed ``<name>.sum`` and ``<name>.count``."""
    return {f"{n}.mean": totals[f"{n}.sum"] / totals[f"{n}.count"] for n in names if totals.get(f"{n}.count")}
