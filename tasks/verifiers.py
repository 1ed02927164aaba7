"""Steps 2-4: verification functions for each instruction, cross-validation, back-translation, consistency.

LLM output is untrusted data: every completion becomes a row; what cannot be used is dropped with a reason,
never a crash. Generated code never runs in this process: the sandbox (``autoif.sandbox``) executes it;
here it is only parsed (``ast``) to check its shape and to recognise duplicates.

Large inputs stream: each step reads its input part by part and writes one output part per batch of
``batch_size`` instructions, so memory holds one batch.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd

from autoif.config import BackTranslationConfig, CrossValidationConfig, NLIMode, VerifierSynthesisConfig
from autoif.llm import LLM
from autoif.schemas.verifiers import BackTranslated, Consistent, CrossValidated, VerifierCandidates
from autoif.jsonl import iter_jsonl
from autoif.steps import map_batches, step
from autoif.tasks.instructions import family_counts

log = logging.getLogger("autoif")

# --------------------------------------------------------------------------------------------- step 2: synthesis

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


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_-]*)[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_PY_LITERAL = re.compile(r"(?<=[:\[,])(\s*)(True|False|None)(?=\s*[,}\]])")
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)  # a backslash and the character it escapes, consumed in pairs
_JSON_ESCAPES = set('"\\/bfnrtu')
_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False}


def extract_json_text(text: str) -> tuple[str | None, list[str]]:
    """The JSON part of a completion: a ```json fence (an unclosed one runs to the end), another fence that
    holds an object, or the outermost ``{...}`` of the text."""
    blocks = [(lang.lower(), body.strip()) for lang, body in _FENCE.findall(text)]
    for lang, body in blocks:
        if lang == "json" and body:
            return body, []
    for lang, body in blocks:
        if body.startswith("{"):
            return body, ["fence_not_json"]
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        return text[start : end + 1], ([] if not text[:start].strip() and not text[end + 1 :].strip() else ["unfenced"])
    return None, []


def loads_repaired(blob: str) -> tuple[Any, list[str]]:
    """``json.loads`` plus repairs of the faults models make: raw newlines in strings, invalid escapes such as
    ``\\'`` (the backslash is kept, escaped), trailing commas, Python ``True/False/None``, a Python dict literal
    (parsed with ``ast.literal_eval``, which runs no code). Raises ValueError when nothing parses."""
    escaped = _ESCAPE.sub(lambda m: m.group(0) if m.group(1) in _JSON_ESCAPES else "\\\\" + m.group(1), blob)
    attempts = [
        ([], lambda: json.loads(blob)),
        (["control_chars"], lambda: json.loads(blob, strict=False)),
        (["invalid_escape"], lambda: json.loads(escaped, strict=False)),
        (["trailing_comma_or_python_literal"], lambda: json.loads(_PY_LITERAL.sub(
            lambda m: m.group(1) + {"True": "true", "False": "false", "None": "null"}[m.group(2)],
            _TRAILING_COMMA.sub(r"\1", escaped)), strict=False)),
        (["python_literal"], lambda: ast.literal_eval(blob)),
    ]
    for repairs, attempt in attempts:
        try:
            return attempt(), repairs
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # JSONDecodeError is a ValueError
            continue
    raise ValueError("not JSON, even after repairs")


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
    fenced = _FENCE.match(func)
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


def _batches(frame: pd.DataFrame, size: int) -> Iterator[pd.DataFrame]:
    for start in range(0, len(frame), size):
        yield frame.iloc[start : start + size]


_CANDIDATE_COLUMNS = ["instruction_id", "instruction", "family", "completion", "func", "func_key", "cases", "n_cases",
                      "case_errors", "repairs", "raw", "reason"]


def _count_values(df: pd.DataFrame, column: str, prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for cell in df[column].dropna():
        for item in json.loads(cell):
            key = f"{prefix}.{item}"
            out[key] = out.get(key, 0.0) + 1.0
    return out


def _synthesis_metrics(df: pd.DataFrame) -> dict[str, float]:
    kept = df[df["reason"].isna()]
    return {
        "instructions": float(df["instruction_id"].nunique()),
        "instructions_with_func": float(kept["instruction_id"].nunique()),
        "cases_kept": float(kept["n_cases"].sum()),
        **_count_values(df, "repairs", "repair"),
        **_count_values(df, "case_errors", "case_dropped"),
    }


@step("verifier_synthesis", schema=VerifierCandidates, config="verifier_synthesis", uses_llm=True,
      metrics=_synthesis_metrics)
def synthesize_verifiers(instructions: pd.DataFrame, llm: LLM, cfg: VerifierSynthesisConfig, seed: int) -> Iterator[pd.DataFrame]:
    """K completions per instruction asking for ``{"func", "cases"}``; one row per completion, one output
    part per batch of instructions (an instruction's completions stay together and in order)."""
    schema = VERIFIER_JSON_SCHEMA if cfg.use_json_schema else None
    yield from _or_empty(map_batches(_synthesize_batch, _batches(instructions, cfg.batch_size), llm=llm, cfg=cfg, seed=seed,
                                     schema=schema), _CANDIDATE_COLUMNS, ints=("completion", "n_cases"))


def _synthesize_batch(b: int, batch: pd.DataFrame, llm: LLM, cfg: VerifierSynthesisConfig, seed: int, schema: dict | None) -> pd.DataFrame:
    prompts = [verifier_prompt(t, cfg) for t in batch["instruction"]]
    completions = llm.generate(prompts, n=cfg.n_completions, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                               seed=seed + b, json_schema=schema)
    rows = []
    for inst, outs in zip(batch.itertuples(), completions):
        for k, text in enumerate(outs):
            p = parse_verifier(text, cfg)
            rows.append({
                "instruction_id": inst.instruction_id, "instruction": inst.instruction, "family": inst.family,
                "completion": k, "func": p.func, "func_key": p.func_key,
                "cases": json.dumps(p.cases) if p.func is not None else None, "n_cases": len(p.cases),
                "case_errors": json.dumps(p.case_errors), "repairs": json.dumps(p.repairs),
                "raw": text[: cfg.max_raw_chars] if isinstance(text, str) else repr(text)[: cfg.max_raw_chars],
                "reason": p.reason,
            })
    return pd.DataFrame(rows, columns=_CANDIDATE_COLUMNS)


def _or_empty(frames: Iterable[pd.DataFrame], columns: list[str], ints: tuple[str, ...] = ()) -> Iterator[pd.DataFrame]:
    """The frames, or one empty frame with the step's columns when there were none (an empty step is valid)."""
    yielded = False
    for frame in frames:
        yielded = True
        yield frame
    if not yielded:
        yield _empty(columns, ints)


# --------------------------------------------------------------------------------------------- step 3: cross-validation


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


def _probe_digest(cfg) -> str:
    return hashlib.sha256(probes_path(cfg.cross_validation).read_bytes()).hexdigest()


def group_batches(frames: Iterable[pd.DataFrame], key: str, max_groups: int) -> Iterator[pd.DataFrame]:
    """Re-cut a stream of frames into frames of at most ``max_groups`` whole groups (rows of a group are
    contiguous in the stream, as the previous step wrote them)."""
    buf: pd.DataFrame | None = None
    for frame in frames:
        if not len(frame):
            continue
        buf = frame.reset_index(drop=True) if buf is None else pd.concat([buf, frame], ignore_index=True)
        codes = buf[key].ne(buf[key].shift()).cumsum()  # 1, 1, 2, 2, 2, 3 ...
        complete = int(codes.iloc[-1]) - 1  # the last group may continue in the next frame
        while complete >= max_groups:
            cut = codes <= max_groups
            yield buf[cut].reset_index(drop=True)
            buf, codes = buf[~cut].reset_index(drop=True), codes[~cut].reset_index(drop=True) - max_groups
            complete -= max_groups
    if buf is not None and len(buf):
        codes = buf[key].ne(buf[key].shift()).cumsum()
        for lo in range(0, int(codes.iloc[-1]), max_groups):
            yield buf[(codes > lo) & (codes <= lo + max_groups)].reset_index(drop=True)


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


_CV_COLUMNS = ["instruction_id", "instruction", "family", "n_completions", "n_funcs", "n_cases", "n_cases_kept",
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
    return pd.DataFrame(rows, columns=_CV_COLUMNS)


_BINS = [i / 10 for i in range(11)]


def _hist(values: list[float], name: str) -> dict[str, float]:
    out = {f"{name}.bin_{lo:.1f}": 0.0 for lo in _BINS[:-1]}
    for v in values:
        lo = min(int(v * 10), 9) / 10
        out[f"{name}.bin_{lo:.1f}"] += 1.0
    out[f"{name}.sum"] = float(sum(values))
    out[f"{name}.count"] = float(len(values))
    return out


def _cv_metrics(df: pd.DataFrame) -> dict[str, float]:
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
    out.update(_hist(accs, "func_accuracy"))
    out.update(_hist(agrees, "case_agreement"))
    out.update(family_counts(df))
    return out


def _means(totals: dict[str, float]) -> dict[str, float]:
    out = {}
    for name in ("func_accuracy", "case_agreement"):
        if totals.get(f"{name}.count"):
            out[f"{name}.mean"] = totals[f"{name}.sum"] / totals[f"{name}.count"]
    return out


@step("cross_validation", schema=CrossValidated, config="cross_validation", key_extra=_probe_digest,
      stream=("candidates",), metrics=_cv_metrics, metrics_final=_means)
def cross_validate(candidates: Iterable[pd.DataFrame], cfg: CrossValidationConfig) -> Iterator[pd.DataFrame]:
    """Per instruction: drop duplicate, non-compiling, always-failing and constant functions; gate on unique
    function and case counts; keep cases that enough functions agree with, then functions accurate enough on
    those cases. One row per instruction with its surviving functions and cases, and a report per function
    and per case saying what happened to it."""
    from autoif.sandbox import shared_sandbox

    probes = read_probes(str(probes_path(cfg)))

    def one(b: int, batch: pd.DataFrame) -> pd.DataFrame:
        return cross_validate_batch(batch, probes, cfg, shared_sandbox(workers=cfg.sandbox_workers, timeout_s=cfg.timeout_s))

    yield from _or_empty(map_batches(one, group_batches(candidates, "instruction_id", cfg.batch_size)),
                         _CV_COLUMNS, ints=("n_completions", "n_funcs", "n_cases", "n_cases_kept"))


def _empty(columns: list[str], ints: tuple[str, ...] = ()) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype="int64" if c in ints else object) for c in columns})


# --------------------------------------------------------------------------------------------- step 4: back-translation

BACK_TRANSLATION_PROMPT = """Below are Python functions that each check whether a response follows some instruction. For each function, write the instruction it checks, as one plain English sentence addressed to the writer of the response. Describe exactly what the code checks, nothing more.
Example: for "def evaluate(response):\\n    return response == response.lower()" the instruction is "Write your whole answer in lowercase letters."
Reply with one JSON object: {{"instructions": [one string per function, in order]}}

{funcs}"""

BACK_TRANSLATION_JSON_SCHEMA: dict = {
    "type": "object",
    "properties": {"instructions": {"type": "array", "items": {"type": "string"}}},
    "required": ["instructions"],
    "additionalProperties": False,
}


def back_translation_prompt(funcs: list[str]) -> str:
    return BACK_TRANSLATION_PROMPT.format(funcs="\n\n".join(f"Function {i + 1}:\n```python\n{f}\n```" for i, f in enumerate(funcs)))


def parse_back_translation(text: str, n_funcs: int) -> tuple[list[str] | None, str | None]:
    """A list of instruction strings (``{"instructions": [...]}`` or a bare list), at most one per function."""
    if not isinstance(text, str):
        return None, "back_translation_unparseable"
    stripped = text.strip()
    blobs = [b for _, b in _FENCE.findall(stripped)] + [stripped]
    start, end = stripped.find("["), stripped.rfind("]")
    if start != -1 and end > start:
        blobs.append(stripped[start : end + 1])
    for blob in blobs:
        try:
            obj, _ = loads_repaired(blob.strip())
        except ValueError:
            continue
        items = obj.get("instructions") if isinstance(obj, dict) else obj
        if isinstance(items, list) and items and all(isinstance(s, str) and s.strip() for s in items):
            return [s.strip() for s in items[:n_funcs]], None
    return None, "back_translation_unparseable"


_BT_COLUMNS = ["instruction_id", "instruction", "family", "funcs", "func_accuracies", "cases", "back_translations", "reason"]
_BT_KEY = ("max_funcs", "temperature", "max_tokens", "batch_size", "use_json_schema")  # what back-translation depends on


@step("back_translation", schema=BackTranslated, config="back_translation", uses_llm=True, stream=("validated",),
      key_fields=_BT_KEY, metrics=family_counts)
def back_translate(validated: Iterable[pd.DataFrame], llm: LLM, cfg: BackTranslationConfig, seed: int) -> Iterator[pd.DataFrame]:
    """The first ``max_funcs`` surviving functions of each instruction go back to the LLM, which writes the
    instruction each one checks (a JSON list)."""
    yield from _or_empty(map_batches(_back_translate_batch, group_batches(validated, "instruction_id", cfg.batch_size),
                                     llm=llm, cfg=cfg, seed=seed), _BT_COLUMNS)


def _back_translate_batch(b: int, batch: pd.DataFrame, llm: LLM, cfg: BackTranslationConfig, seed: int) -> pd.DataFrame:
    funcs = [json.loads(f)[: cfg.max_funcs] for f in batch["funcs"]]
    outs = llm.generate([back_translation_prompt(f) for f in funcs], n=1, temperature=cfg.temperature,
                        max_tokens=cfg.max_tokens, seed=seed + b,
                        json_schema=BACK_TRANSLATION_JSON_SCHEMA if cfg.use_json_schema else None)
    rows = []
    for r, fs, out in zip(batch.itertuples(), funcs, outs):
        texts, reason = parse_back_translation(out[0] if out else None, len(fs))
        rows.append({"instruction_id": r.instruction_id, "instruction": r.instruction, "family": r.family,
                     "funcs": r.funcs, "func_accuracies": r.func_accuracies, "cases": r.cases,
                     "back_translations": json.dumps(texts) if texts is not None else None, "reason": reason})
    return pd.DataFrame(rows, columns=_BT_COLUMNS)


# --------------------------------------------------------------------------------------------- step 4b: consistency

JUDGE_PROMPT = """Do these two instructions ask for compatible things? The first is the original instruction; the second was written from code that checks responses to it.
Original: {premise}
From code: {hypothesis}
Answer "contradiction" if a response cannot satisfy both, "entailment" if the second says the same as the first or less, "neutral" otherwise.
Reply with one JSON object: {{"label": "entailment" | "neutral" | "contradiction"}}"""

JUDGE_LABELS = ("entailment", "neutral", "contradiction")
JUDGE_JSON_SCHEMA: dict = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": list(JUDGE_LABELS)}},
    "required": ["label"],
    "additionalProperties": False,
}


def parse_judge_label(text: str) -> str | None:
    """The judge's label: from ``{"label": ...}``, else a lone label word in the reply; None if unclear."""
    if not isinstance(text, str):
        return None
    blob, _ = extract_json_text(text)
    if blob is not None:
        try:
            obj, _ = loads_repaired(blob)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("label"), str) and obj["label"].strip().lower() in JUDGE_LABELS:
            return obj["label"].strip().lower()
    found = {w for w in re.findall(r"[a-z]+", text.lower()) if w in JUDGE_LABELS}
    return found.pop() if len(found) == 1 else None


class NLIClassifier:
    """A sequence-pair classifier (premise, hypothesis) -> label, loaded once per process and path."""

    def __init__(self, path: str) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        self.id2label = {int(k): str(v).lower() for k, v in self.model.config.id2label.items()}

    def labels(self, pairs: list[tuple[str, str]], batch_size: int) -> list[str]:
        out: list[str] = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            enc = self.tokenizer([p for p, _ in chunk], [h for _, h in chunk], truncation=True, padding=True, return_tensors="pt")
            with self.torch.no_grad():
                logits = self.model(**enc).logits
            out.extend(self.id2label[int(i)] for i in logits.argmax(-1).tolist())
        return out


@functools.lru_cache(maxsize=2)
def nli_classifier(path: str) -> NLIClassifier:
    return NLIClassifier(path)


_CONSISTENT_COLUMNS = ["instruction_id", "instruction", "family", "funcs", "func_accuracies", "cases", "back_translations",
                       "labels", "reason"]


def _consistency_metrics(df: pd.DataFrame) -> dict[str, float]:
    out = family_counts(df)
    for cell in df["labels"].dropna():
        for label in json.loads(cell):
            key = f"label.{label or 'unparseable'}"
            out[key] = out.get(key, 0.0) + 1.0
    return out


@step("consistency_filter", schema=Consistent, config="back_translation", uses_llm=True, stream=("translated",),
      metrics=_consistency_metrics)
def consistency_filter(translated: Iterable[pd.DataFrame], llm: LLM, cfg: BackTranslationConfig, seed: int) -> Iterator[pd.DataFrame]:
    """Premise = the instruction, hypothesis = each back-translation; drop the instruction on any contradiction.
    ``nli``: a local classifier (loaded once); ``llm_judge``: the engine labels the pair; ``off``: keep all."""
    if cfg.mode is NLIMode.nli and not cfg.nli_model:
        raise ValueError("back_translation.mode=nli needs back_translation.nli_model (a local path or model id)")
    yield from _or_empty(map_batches(_consistency_batch, group_batches(translated, "instruction_id", cfg.batch_size),
                                     llm=llm, cfg=cfg, seed=seed), _CONSISTENT_COLUMNS)


def _consistency_batch(b: int, batch: pd.DataFrame, llm: LLM, cfg: BackTranslationConfig, seed: int) -> pd.DataFrame:
    pairs = [(r.instruction, h) for r in batch.itertuples() for h in json.loads(r.back_translations)]
    if cfg.mode is NLIMode.nli:
        labels: list[str | None] = list(nli_classifier(cfg.nli_model).labels(pairs, cfg.nli_batch_size))
    elif cfg.mode is NLIMode.llm_judge:
        prompts = [JUDGE_PROMPT.format(premise=p, hypothesis=h) for p, h in pairs]
        outs = llm.generate(prompts, n=1, temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=seed + b,
                            json_schema=JUDGE_JSON_SCHEMA if cfg.use_json_schema else None) if prompts else []
        labels = [parse_judge_label(o[0] if o else None) for o in outs]
    else:
        labels = [None] * len(pairs)
    rows, pos = [], 0
    for r in batch.itertuples():
        n = len(json.loads(r.back_translations))
        mine, pos = labels[pos : pos + n], pos + n
        if cfg.mode is NLIMode.off:
            reason = None
        elif cfg.contradiction_label.lower() in mine:
            reason = "contradiction"
        elif any(label is None for label in mine):
            reason = "judge_unparseable"
        else:
            reason = None
        rows.append({"instruction_id": r.instruction_id, "instruction": r.instruction, "family": r.family,
                     "funcs": r.funcs, "func_accuracies": r.func_accuracies, "cases": r.cases,
                     "back_translations": r.back_translations,
                     "labels": json.dumps(mine) if cfg.mode is not NLIMode.off else None, "reason": reason})
    return pd.DataFrame(rows, columns=_CONSISTENT_COLUMNS)
