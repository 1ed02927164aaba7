"""Contamination check: a row whose query, response or instruction shares a word 13-gram (config) with an
IFEval or IFBench prompt (loaded offline from the shipped copies) is dropped as ``contaminated``."""
from __future__ import annotations

import functools

import pandas as pd
from autoif.tasks.verification import VERIFIED_COLUMNS

DECONTAMINATED_COLUMNS = [*[c for c in VERIFIED_COLUMNS if c != "reason"], "contaminated_fields", "reason"]

from autoif.config import ContaminationConfig
from autoif.evaluation.contamination import benchmark_ngrams, ngrams
from autoif.evaluation.data import Benchmark, default_prompts_path, load_prompts

CHECKED = ("query", "response", "instruction")


@functools.lru_cache(maxsize=4)
def benchmark_index(benchmarks: tuple[str, ...], n: int) -> frozenset:
    """The n-grams of every prompt of the named benchmarks (built once per process)."""
    texts: list[str] = []
    for name in benchmarks:
        b = Benchmark(name)
        texts.extend(load_prompts(b, default_prompts_path(b))["prompt"].tolist())
    return frozenset(benchmark_ngrams(texts, n))


def contaminated_fields(row: dict, index: frozenset, n: int) -> list[str]:
    return [c for c in CHECKED if isinstance(row.get(c), str) and ngrams(row[c], n) & index]


def decontaminate(verified: pd.DataFrame, cfg: ContaminationConfig) -> pd.DataFrame:
    """Every verified response (dropped ones too: a failing response is a DPO "rejected" and is training data
    as much as a passing one); a contaminated one is dropped as ``contaminated`` whatever it was before, and
    ``contaminated_fields`` says which text overlaps. Other rows keep their verification reason."""
    index = benchmark_index(tuple(cfg.benchmarks), cfg.ngram) if cfg.check else frozenset()
    out = verified[[c for c in VERIFIED_COLUMNS if c != "reason"]].copy()
    fields = [contaminated_fields(r, index, cfg.ngram) if index else [] for r in verified.to_dict("records")]
    out["contaminated_fields"] = [",".join(f) or None for f in fields]
    out["reason"] = ["contaminated" if f else r for f, r in zip(fields, verified["reason"])]
    return out[DECONTAMINATED_COLUMNS]
