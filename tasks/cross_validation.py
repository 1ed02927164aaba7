"""Step 3: cross-validation in the sandbox. Per instruction: drop duplicate, non-compiling, always-failing and
constant functions; gate on unique function and case counts; keep cases that enough functions agree with,
then functions accurate enough on those cases (code or paper thresholds, all in config). Exceptions and
timeouts count as wrong."""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd
from autoif.tasks.batching import empty_frame, group_batches
from autoif.tasks.metrics import family_counts, histogram, means

from autoif.config import CrossValidationConfig
from autoif.jsonl import iter_jsonl


def probes_path(cfg: CrossValidationConfig) -> Path:
    if cfg.probes_path:
        return Path(cfg.probes_path)
    return Path(str(resources.files("autoif") / "data" / "probes.jsonl"))


class ProbeFileError(ValueError):
    """A probe file row is malformed; names the file and line."""


@functools.lru_cache(maxsize=8)
def read_probes(path: str) -> tuple[str, ...]:
    """Probe responses (JSONL ``{"response": str}``): diverse texts every function also runs on, so a function
    that answers the same on all of them and on all its cases is recognised as unable to discriminate."""
    out = []
    for lineno, rec in iter_jsonl(path, ProbeFileError):
        if not isinstance(rec.get("response"), str):
            raise ProbeFileError(f"{path}:{lineno}: field 'response' must be a string")
        out.append(rec["response"])
    return tuple(out)



def probes_digest(cfg) -> str:
    """The probe file's content: part of the cross-validation key."""
    return hashlib.sha256(probes_path(cfg.cross_validation).read_bytes()).hexdigest()


@dataclass
class _Func:
    completion: int
    src: str
    key: str
    reason: str | None = None
    detail: str = ""
    values: dict[int, bool | None] = field(default_factory=dict)  # input index -> verdict (None: error/timeout)
    accuracy: float | None = None


@dataclass
class _Case:
    input: str
    output: bool
    reason: str | None = None
    agreement: float | None = None


def _instruction_cases(group: pd.DataFrame) -> list[_Case]:
    """Unique (input, label) cases of all completions; an input given both labels is a conflict, dropped."""
    labels: dict[str, set[bool]] = {}
    order: list[tuple[str, bool]] = []
    for cell in group["cases"].dropna():
        for c in json.loads(cell):
            pair = (c["input"], bool(c["output"]))
            if pair[1] not in labels.setdefault(pair[0], set()):
                labels[pair[0]].add(pair[1])
                order.append(pair)
    return [_Case(i, o, reason="conflicting_labels" if len(labels[i]) > 1 else None) for i, o in order]


def _funcs(group: pd.DataFrame) -> list[_Func]:
    seen: set[str] = set()
    out = []
    for r in group.itertuples():
        f = _Func(completion=int(r.completion), src=r.func, key=r.func_key)
        if f.key in seen:
            f.reason = "duplicate_function"
        seen.add(f.key)
        out.append(f)
    return out


def _judge_instruction(funcs: list[_Func], cases: list[_Case], case_ids: list[int], probe_ids: list[int],
                       cfg: CrossValidationConfig) -> str | None:
    """Apply the degenerate filter, the count gates and the two accuracy thresholds; returns the instruction's
    drop reason (None = kept). Fills each function's and case's reason, accuracy and agreement."""
    for f in funcs:
        if f.reason is not None:
            continue
        seen = [f.values.get(i) for i in case_ids + probe_ids]
        verdicts = {v for v in seen if v is not None}
        if f.detail.startswith("compile_error"):
            f.reason = "compile_error"
        elif not verdicts:
            f.reason = "always_error"
        elif cfg.drop_constant_funcs and len(verdicts) == 1:
            f.reason = "constant_verdict"
    voters = [f for f in funcs if f.reason is None]
    live = [(c, i) for c, i in zip(cases, case_ids) if c.reason is None]
    for c, i in live:  # recorded even when a count gate drops the instruction: it explains the funnel
        c.agreement = sum(f.values.get(i) is c.output for f in voters) / len(voters) if voters else 0.0
    reason = _gates(funcs, voters, live, cfg)
    if reason is not None:
        for item in [*funcs, *cases]:
            if item.reason is None:
                item.reason = "instruction_dropped"
    return reason


def _gates(funcs: list[_Func], voters: list[_Func], live: list[tuple[_Case, int]], cfg: CrossValidationConfig) -> str | None:
    if len(voters) < cfg.min_unique_funcs:
        return "too_few_functions"
    if len(live) < cfg.min_unique_cases:
        return "too_few_cases"
    for c, _ in live:
        if not cfg.case_accuracy.holds(c.agreement):
            c.reason = "low_agreement"
    kept = [(c, i) for c, i in live if c.reason is None]
    if cfg.require_both_labels and len({c.output for c, _ in kept}) < 2:
        return "one_label_cases"
    for f in voters:
        f.accuracy = sum(f.values.get(i) is c.output for c, i in kept) / len(kept) if kept else 0.0
        if not cfg.func_accuracy.holds(f.accuracy):
            f.reason = "low_accuracy"
    if sum(f.reason is None for f in voters) < cfg.min_surviving_funcs:
        return "no_surviving_function"
    return None


CV_COLUMNS = ["instruction_id", "instruction", "family", "n_completions", "n_funcs", "n_cases", "n_cases_kept",
              "funcs", "func_accuracies", "cases", "func_report", "case_report", "reason"]


def cross_validate_batch(group: pd.DataFrame, probes: tuple[str, ...], cfg: CrossValidationConfig, sandbox) -> pd.DataFrame:
    """Cross-validate a batch of instructions with one sandbox run: every non-duplicate function on its
    instruction's test cases and on the probes."""
    inputs: dict[str, int] = {p: i for i, p in enumerate(dict.fromkeys(probes))}
    probe_ids = list(inputs.values())
    plan = []
    for iid, g in group.groupby("instruction_id", sort=False):
        cases = _instruction_cases(g)
        case_ids = [inputs.setdefault(c.input, len(inputs)) for c in cases]
        plan.append((iid, g, _funcs(g), cases, case_ids))
    srcs: list[str] = []
    pairs: list[tuple[int, int]] = []
    owners: list[_Func] = []
    for _, _, funcs, _, case_ids in plan:
        for f in funcs:
            if f.reason is None:
                k = len(srcs)
                srcs.append(f.src)
                owners.append(f)
                pairs.extend((k, j) for j in dict.fromkeys(case_ids + probe_ids))
    input_list = list(inputs)
    results = sandbox.run(srcs, input_list, pairs) if pairs else []
    for res in results:
        f = owners[res.func_index]
        f.values[res.input_index] = res.value
        if res.outcome.value == "compile_error" and not f.detail:
            f.detail = f"compile_error: {res.detail}"
        elif res.value is None and not f.detail:
            f.detail = f"{res.outcome.value}: {res.detail}"
    rows = []
    for iid, g, funcs, cases, case_ids in plan:
        reason = _judge_instruction(funcs, cases, case_ids, probe_ids, cfg)
        survivors = [f for f in funcs if f.reason is None] if reason is None else []
        kept_cases = [c for c in cases if c.reason is None]
        first = g.iloc[0]
        rows.append({
            "instruction_id": iid, "instruction": first["instruction"], "family": first["family"],
            "n_completions": len(g), "n_funcs": len({f.key for f in funcs}), "n_cases": len(cases),
            "n_cases_kept": len(kept_cases) if reason is None else 0,
            "funcs": json.dumps([f.src for f in survivors]),
            "func_accuracies": json.dumps([f.accuracy for f in survivors]),
            "cases": json.dumps([{"input": c.input, "output": c.output} for c in kept_cases] if reason is None else []),
            "func_report": json.dumps([{"completion": f.completion, "key": f.key, "accuracy": f.accuracy,
                                        "reason": f.reason, "detail": f.detail[:200]} for f in funcs]),
            "case_report": json.dumps([{"input": c.input[:200], "output": c.output, "agreement": c.agreement,
                                        "reason": c.reason} for c in cases]),
            "reason": reason,
        })
    return pd.DataFrame(rows, columns=CV_COLUMNS)



def cv_metrics(df: pd.DataFrame) -> dict[str, float]:
    out: dict[str, float] = {}
    accs, agrees = [], []

    def bump(key: str) -> None:
        out[key] = out.get(key, 0.0) + 1.0

    for r in df.itertuples():
        for f in json.loads(r.func_report):
            bump(f"funcs.{f['reason'] or 'kept'}")
            if f["accuracy"] is not None:
                accs.append(f["accuracy"])
        for c in json.loads(r.case_report):
            bump(f"cases.{c['reason'] or 'kept'}")
            if c["agreement"] is not None:
                agrees.append(c["agreement"])
    out.update(histogram(accs, "func_accuracy"))
    out.update(histogram(agrees, "case_agreement"))
    out.update(family_counts(df))
    return out


def cv_means(totals: dict[str, float]) -> dict[str, float]:
    return means(totals, ("func_accuracy", "case_agreement"))


def cv_batches(candidates: Iterable[pd.DataFrame], cfg: CrossValidationConfig) -> Iterator[pd.DataFrame]:
    """``batch_size`` whole instructions (all their completions) per sandbox batch."""
    return group_batches(candidates, "instruction_id", cfg.batch_size)


def no_cross_validated() -> pd.DataFrame:
    return empty_frame(CV_COLUMNS, ints=("n_completions", "n_funcs", "n_cases", "n_cases_kept"))


def cross_validate(batch: pd.DataFrame, cfg: CrossValidationConfig, sandbox) -> pd.DataFrame:
    """One row per instruction of the batch with its surviving functions and cases, and a report per function
    and per case saying what happened to it."""
    return cross_validate_batch(batch, read_probes(str(probes_path(cfg))), cfg, sandbox)
