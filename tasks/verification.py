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
    owners: list[list[str]] = []
    for i, r in enumerate(batch.itertuples()):
        ids = json.loads(r.func_ids)
        owners.append(ids)
        for fid, src in zip(ids, json.loads(r.funcs)):
            if fid not in funcs:
                funcs[fid] = len(srcs)
                srcs.append(src)
            pairs.append((funcs[fid], i))
    results = sandbox.run(srcs, batch["response"].tolist(), pairs) if pairs else []
    outcome: dict[tuple[int, int], tuple[str, bool | None]] = {
        (res.func_index, res.input_index): (res.outcome.value, res.value) for res in results}
    rows = []
    for i, (r, ids) in enumerate(zip(batch.to_dict("records"), owners)):
        per = [{"func_id": fid, "outcome": outcome[(funcs[fid], i)][0], "value": outcome[(funcs[fid], i)][1]} for fid in ids]
        passed = sum(p["value"] is True for p in per)
        rate = passed / len(per) if per else 0.0
        rows.append({**{k: r[k] for k in RESPONSE_COLUMNS if k != "reason"}, "pass_rate": rate, "n_funcs": len(per),
                     "n_passed": passed, "n_errors": sum(p["outcome"] in _ERRORS for p in per),
                     "n_timeouts": sum(p["outcome"] == "timeout" for p in per), "func_results": json.dumps(per),
                     "reason": None if per and cfg.pass_rate.holds(rate) else ("no_functions" if not per else "low_pass_rate")})
    return pd.DataFrame(rows, columns=VERIFIED_COLUMNS)


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
