"""Step 6, verification: every surviving function of the instruction runs on every response, in the sandbox,
one sandbox job per batch. A response's pass rate is the mean over its functions; exceptions and timeouts
count as fail (and are counted). Kept: pass rate above the preset's threshold (code: > 0, paper: > 0.5)."""
from __future__ import annotations

import json
from typing import Iterable, Iterator

import pandas as pd
from autoif.tasks.batching import empty_frame, row_batches
from autoif.tasks.metrics import histogram, means
from autoif.tasks.response_generation import RESPONSE_COLUMNS

from autoif.config import VerificationConfig

VERIFIED_COLUMNS = [*[c for c in RESPONSE_COLUMNS if c != "reason"], "pass_rate", "n_funcs", "n_passed", "n_errors",
                    "n_timeouts", "func_results", "reason"]
_ERRORS = {"error", "compile_error", "invalid_return", "killed"}


def verification_batches(responses: Iterable[pd.DataFrame], cfg: VerificationConfig) -> Iterator[pd.DataFrame]:
    return row_batches(responses, cfg.batch_size)


def no_verified() -> pd.DataFrame:
    return empty_frame(VERIFIED_COLUMNS, ints=("response_index", "n_funcs", "n_passed", "n_errors", "n_timeouts"))


def verify(batch: pd.DataFrame, cfg: VerificationConfig, sandbox) -> pd.DataFrame:
    """``func_results``: per function ``{"func_id", "outcome", "value"}`` (value null on error/timeout)."""
    funcs: dict[str, int] = {}
    srcs: list[str] = []
    pairs: list[tuple[int, int]] = []
    owners: list[list[int]] = []
    parsed: dict[tuple[str, str], list[int]] = {}  # a pair's K responses share one (func_ids, funcs) cell
    for i, (ids_cell, funcs_cell) in enumerate(zip(batch["func_ids"].tolist(), batch["funcs"].tolist())):
        idx = parsed.get((ids_cell, funcs_cell))
        if idx is None:
            idx = []
            for fid, src in zip(json.loads(ids_cell), json.loads(funcs_cell)):
                if fid not in funcs:
                    funcs[fid] = len(srcs)
                    srcs.append(src)
                idx.append(funcs[fid])
            parsed[(ids_cell, funcs_cell)] = idx
        owners.append(idx)
        pairs.extend((k, i) for k in idx)
    fid_of = list(funcs)
    results = sandbox.run(srcs, batch["response"].tolist(), pairs) if pairs else []
    outcome = {(res.func_index, res.input_index): (res.outcome.value, res.value) for res in results}
    rate, n_funcs, n_passed, n_errors, n_timeouts, per_func, reason = [], [], [], [], [], [], []
    for i, idx in enumerate(owners):
        per = [{"func_id": fid_of[k], "outcome": outcome[(k, i)][0], "value": outcome[(k, i)][1]} for k in idx]
        passed = sum(p["value"] is True for p in per)
        r = passed / len(per) if per else 0.0
        rate.append(r)
        n_funcs.append(len(per))
        n_passed.append(passed)
        n_errors.append(sum(p["outcome"] in _ERRORS for p in per))
        n_timeouts.append(sum(p["outcome"] == "timeout" for p in per))
        per_func.append(json.dumps(per))
        reason.append(None if per and cfg.pass_rate.holds(r) else ("no_functions" if not per else "low_pass_rate"))
    out = batch[[c for c in RESPONSE_COLUMNS if c != "reason"]].reset_index(drop=True)
    out = out.assign(pass_rate=rate, n_funcs=n_funcs, n_passed=n_passed, n_errors=n_errors, n_timeouts=n_timeouts,
                     func_results=per_func, reason=pd.Series(reason, dtype=object))
    return out[VERIFIED_COLUMNS]


def verification_metrics(df: pd.DataFrame) -> dict[str, float]:
    out = histogram([float(x) for x in df["pass_rate"]], "pass_rate")
    for cell in df["func_results"]:
        for p in json.loads(cell):
            key = f"outcome.{p['outcome']}"
            out[key] = out.get(key, 0.0) + 1.0
    out["calls_error"] = float(df["n_errors"].sum())
    out["calls_timeout"] = float(df["n_timeouts"].sum())
    for src, g in df.groupby("verifier_source"):
        out[f"verifier.{src}.responses"] = float(len(g))
        out[f"verifier.{src}.kept"] = float(g["reason"].isna().sum())
    return out


def verification_means(totals: dict[str, float]) -> dict[str, float]:
    return means(totals, ("pass_rate",))
