"""Contamination check: word n-gram overlap (n = 13 by default, as AutoIF and GPT-3 use) with a benchmark.

``contamination_report(texts, benchmark_texts)`` flags each training text that shares at least one
n-gram with any benchmark text (lower-cased, punctuation stripped, whitespace words).
"""
from __future__ import annotations

import re
from typing import Iterable

import pandas as pd

_WORD = re.compile(r"[a-z0-9]+")


def ngrams(text: str, n: int = 13) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def benchmark_ngrams(texts: Iterable[str], n: int = 13) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for t in texts:
        out |= ngrams(t, n)
    return out


def contamination_report(texts: pd.Series, benchmark_texts: Iterable[str], n: int = 13) -> pd.DataFrame:
    """Per text: ``n_overlapping_ngrams`` and ``contaminated`` (at least one shared n-gram)."""
    bench = benchmark_ngrams(benchmark_texts, n)
    counts = [len(ngrams(t, n) & bench) for t in texts]
    return pd.DataFrame(
        {"text": list(texts), "n_overlapping_ngrams": counts, "contaminated": [c > 0 for c in counts]},
        index=texts.index,
    )
