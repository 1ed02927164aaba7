"""Step 2: verifier synthesis. Per instruction, K completions asking for JSON ``{"func", "cases"}``: a Python
function ``evaluate(response) -> bool`` and test cases for it.

LLM output is untrusted data: every completion becomes a row; what cannot be used is dropped with a reason,
never a crash. Generated code never runs here: it is only parsed (``ast``) to check its shape and to
recognise duplicates (the sandbox runs it in cross-validation).
"""
from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import pandas as pd
from autoif.tasks.batching import empty_frame, row_batches
from autoif.tasks.json_repair import FENCE, extract_json_text, loads_repaired, outer_braces
from autoif.tasks.metrics import count_values

from autoif.config import VerifierSynthesisConfig
from autoif.llm import LLM, generate_each

VERIFIER_PROMPT = """You write Python functions that check whether a response follows an instruction.
Instruction: {instruction}
Write a function `def evaluate(response: str) -> bool` that returns True when the string `response` follows the instruction and False otherwise. Use only the Python standard library.
Also write {n_cases} test cases: each has an `input` (a response string) and the expected `output` (true or false). Include both responses that follow the instruction and responses that do not.
Reply with one JSON object inside a ```json fence, with the function source in the key "func" (newlines written as \\n) and the test cases in the key "cases":
```json
{{"func": "def evaluate(response):\\n    ...", "cases": [{{"input": "...", "output": true}}, {{"input": "...", "output": false}}]}}
```"""

VERIFIER_JSON_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "func": {"type": "string"},
        "cases": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"input": {"type": "string"}, "output": {"type": "boolean"}},
                "required": ["input", "output"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["func", "cases"],
    "additionalProperties": False,
}


def verifier_prompt(instruction: str, cfg: VerifierSynthesisConfig) -> str:
    return VERIFIER_PROMPT.format(instruction=instruction, n_cases=cfg.n_cases)


@dataclass
class ParsedVerifier:
    """What one completion yielded: a function (or why not), its test cases, and what was repaired."""

    func: str | None = None
    func_key: str | None = None  # hash of the normalised source (formatting and comments removed)
    cases: list[dict] = field(default_factory=list)
    case_errors: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    reason: str | None = None


_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False}


def normalise_label(value: Any) -> bool | None:
    """A test case's expected output: True/False, 1/0 and the strings true/false/1/0 (any case); else None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return _BOOL_WORDS.get(value.strip().lower())
    return None


def func_key(tree: ast.AST) -> str:
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()[:16]


def parse_verifier(text: str, cfg: VerifierSynthesisConfig) -> ParsedVerifier:
    """One completion -> function + cases, or the reason it is unusable. Never raises on bad input."""
    out = ParsedVerifier()
    if not isinstance(text, str) or not text.strip():
        out.reason = "empty_completion"
        return out
    blob, out.repairs = extract_json_text(text)
    if blob is None:
        out.reason = "no_json"
        return out
    try:
        obj, repairs = loads_repaired(blob)
    except ValueError:
        whole = outer_braces(text)  # a fence inside a JSON string cut the fenced block short
        try:
            if whole is None or whole == blob:
                raise ValueError("no other JSON candidate")
            obj, repairs = loads_repaired(whole)
            repairs = ["fence_inside_json", *repairs]
        except ValueError:
            out.reason = "invalid_json"
            return out
    out.repairs += repairs
    if not isinstance(obj, dict):
        out.reason = "json_not_object"
        return out
    func = obj.get("func")
    if func is None or (isinstance(func, str) and not func.strip()):
        out.reason = "missing_func"
        return out
    if not isinstance(func, str):
        out.reason = "func_not_string"
        return out
    func = func.strip()
    fenced = FENCE.match(func)
    if fenced:  # a markdown fence inside the JSON string
        func = fenced.group(2).strip()
        out.repairs.append("fence_in_func")
    if "\n" not in func and "\\n" in func:  # double-escaped: the whole source on one line with literal \n
        func = func.replace("\\n", "\n").replace("\\t", "\t")
        out.repairs.append("escaped_newlines")
    if len(func) > cfg.max_func_chars:
        out.reason = "func_too_long"
        return out
    try:
        tree = ast.parse(func)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        out.reason = "syntax_error"
        return out
    if not any(isinstance(n, ast.FunctionDef) and n.name == "evaluate" for n in tree.body):
        out.reason = "no_evaluate_function"
        return out
    out.func, out.func_key = func, func_key(tree)
    cases = obj.get("cases")
    if not isinstance(cases, list):
        out.case_errors.append("cases_missing" if cases is None else "cases_not_list")
        return out
    for case in cases:
        if not isinstance(case, dict):
            out.case_errors.append("case_not_object")
            continue
        if "input" not in case or "output" not in case:
            out.case_errors.append("case_missing_field")
            continue
        if not isinstance(case["input"], str):
            out.case_errors.append("case_input_not_string")
            continue
        if len(case["input"]) > cfg.max_case_chars:
            out.case_errors.append("case_input_too_long")
            continue
        label = normalise_label(case["output"])
        if label is None:
            out.case_errors.append("case_bad_label")
            continue
        out.cases.append({"input": case["input"], "output": label})
    return out



CANDIDATE_COLUMNS = ["instruction_id", "instruction", "family", "completion", "func", "func_key", "cases", "n_cases",
                     "case_errors", "repairs", "raw", "reason"]


def synthesis_metrics(df: pd.DataFrame) -> dict[str, float]:
    kept = df[df["reason"].isna()]
    return {
        "instructions": float(df["instruction_id"].nunique()),
        "instructions_with_func": float(kept["instruction_id"].nunique()),
        "cases_kept": float(kept["n_cases"].sum()),
        **count_values(df, "repairs", "repair"),
        **count_values(df, "case_errors", "case_dropped"),
    }


def synthesis_batches(instructions: Iterable[pd.DataFrame], cfg: VerifierSynthesisConfig) -> Iterator[pd.DataFrame]:
    """``batch_size`` instructions per batch (an instruction's completions stay together and in order)."""
    return row_batches(instructions, cfg.batch_size)


def no_candidates() -> pd.DataFrame:
    return empty_frame(CANDIDATE_COLUMNS, ints=("completion", "n_cases"))


def synthesize_batch(batch: pd.DataFrame, llm: LLM, cfg: VerifierSynthesisConfig, seed: int, batch_index: int) -> pd.DataFrame:
    """K completions per instruction of the batch; one row per completion (a prompt the engine refused is one
    row with the engine's reason, e.g. ``prompt_too_long``)."""
    schema = VERIFIER_JSON_SCHEMA if cfg.use_json_schema else None
    prompts = [verifier_prompt(t, cfg) for t in batch["instruction"]]
    gen = generate_each(llm, prompts, n=cfg.n_completions, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                        seed=seed + batch_index, json_schema=schema)
    rows = []
    for inst, outs, error, detail in zip(batch.itertuples(), gen.texts, gen.errors, gen.details):
        base = {"instruction_id": inst.instruction_id, "instruction": inst.instruction, "family": inst.family}
        if outs is None:
            rows.append({**base, "completion": 0, "func": None, "func_key": None, "cases": None, "n_cases": 0,
                         "case_errors": "[]", "repairs": "[]", "raw": (detail or "")[: cfg.max_raw_chars], "reason": error})
            continue
        for k, text in enumerate(outs):
            p = parse_verifier(text, cfg)
            rows.append({
                **base, "completion": k, "func": p.func, "func_key": p.func_key,
                "cases": json.dumps(p.cases) if p.func is not None else None, "n_cases": len(p.cases),
                "case_errors": json.dumps(p.case_errors), "repairs": json.dumps(p.repairs),
                "raw": text[: cfg.max_raw_chars] if isinstance(text, str) else repr(text)[: cfg.max_raw_chars],
                "reason": p.reason,
            })
    return pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)
