"""Side by side with AutoIF on its own data, stage B (acceptance point 10 of issue 10).

AutoIF's published sample files (``tests/data/autoif-sample/``, Apache-2.0, LICENSE beside them) replayed
through our steps and through AutoIF's published scripts (QwenLM/AutoIF, commit d67b9ba), whose filter
logic is restated below, clearly apart from ours:

1. verification, ``query_rft.jsonl`` (20 query + instruction rows x 16 responses, 2-3 functions each):
   our ``verify_responses`` (code preset: pass rate > 0; paper: > 0.5) vs ``code/7_query_vertification.py``;
2. score filter, ``query_rft_score.jsonl`` (20 judged responses): our ``score_responses`` on the canned judge
   outputs (code: > 8; paper: >= 8) vs ``code/8_query_score_filiter.py``, and both vs
   ``query_score_filter.jsonl`` (the 16 rows AutoIF kept);
3. query-level DPO pairs: ``dpo_query_w_funcs.jsonl`` (21 prompts x 8 responses, one function) through our
   verification + ``query_dpo`` vs ``code_dpo/1_dpo_rft_wash.py`` + ``code_dpo/2_dpo_data_query_construct.py``;
   and ``dpo_query_eval_score_results.jsonl`` (20 prompts x 8 responses with AutoIF's own pass rates, the
   input of AutoIF's pairing script) through our ``query_dpo`` vs that script.

Every generated function runs in our sandbox, AutoIF's side too (its ``exec`` semantics are reproduced
inside the sandbox, see :func:`autoif_wrapped`); nothing generated runs in this process.

    python benchmarks/stage_b_autoif_compare.py        # markdown tables, then `name = value` lines
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "tests" / "data" / "autoif-sample"  # AutoIF's sample, with its licence
AUTOIF_SEED = 0  # AutoIF's pairing script never seeds `random`; the restatement does, so a run is reproducible
AUTOIF_SEEDS = range(200)  # pair counts of the pairing script over these seeds (duplicate texts make them vary)


def load(name: str, root: Path = SAMPLE_DIR) -> list[dict]:
    return [json.loads(line) for line in (root / name).read_text().splitlines() if line.strip()]


# ============================================================================================================
# AutoIF's published logic, restated (for comparison only; not the project's code)
#
# code/7_query_vertification.py and code_dpo/1_dpo_rft_wash.py, per row:
#     for func, score in result['eval_func']:
#         local_vars = {}; exec(func, globals(), local_vars); eval_funcs.append(local_vars['evaluate'])
#         (1_dpo_rft_wash.py: `try: exec(...) except Exception: continue`)
#     for response in result['gpt-answer']:
#         acc = []
#         for eval_func in eval_funcs:
#             signal.alarm(5)   (1_dpo_rft_wash.py: 3)
#             try: res = eval_func(response)  except Exception: res = None
#             if res is not None:
#                 try: acc.append(int(res))  except: continue
#         acc = np.mean(acc) if acc else 0
#         7_query_vertification.py: keep the response if acc > 0;  1_dpo_rft_wash.py: keep [response, acc]
#     7_: rows {instruction, query = re.findall(r'\[Query\](.*)$', prompt, re.DOTALL)[0].strip(), response},
#         then deduplicated as JSON strings (identical rows collapse)
# code/8_query_score_filiter.py, per row:
#     scores = [int(m[0]) for each in gen if (m := re.findall(r'Score: (\d+?)$', each))]
#     keep the row if (np.mean(scores) if scores else 0) > 8
# code_dpo/2_dpo_data_query_construct.py, per row of eval_score_results:
#     positive = [r for r, acc in response if acc >= 0.5]; negative = [r for r, acc in response if acc == 0]
#     if len(positive) >= 2 or len(negative) >= 2: sample min(2, n) of each side
#     elif len(positive) >= 1 or len(negative) >= 1: sample min(1, n) of each side
#     else: skip the row
#     pairs = set(itertools.product(positive_samples, negative_samples))   (random.sample, unseeded)
# ============================================================================================================

# The modules 7_query_vertification.py imports at module level that our sandbox allows: `exec(func,
# globals(), ...)` hands the script's globals to every function, so these names resolve without an import
# there. (The script's other globals: jsonlines, os, nltk, np, time, signal, requests, ...; no function of
# the sample uses any of them: see `script_globals_used`.)
AUTOIF_SCRIPT_MODULES = ("re", "json", "random", "copy")
AUTOIF_SCRIPT_GLOBALS = ("jsonlines", "json", "random", "re", "os", "copy", "nltk", "np", "time", "retry", "logging",
                         "signal", "tqdm", "requests", "ThreadPoolExecutor", "TimeoutError")

_WRAPPER = '''
import copy, json, random, re
_G = {{"__builtins__": __builtins__, "__name__": "__main__", "copy": copy, "json": json, "random": random, "re": re}}
_L = {{}}
exec({src!r}, _G, _L)  # AutoIF: exec(func, globals(), local_vars): top-level defs and imports land in _L
_evaluate = _L["evaluate"]


class AutoIFSkip(Exception):
    pass


def evaluate(response):
    res = _evaluate(response)  # AutoIF: an exception (or the 5 s alarm) -> res = None -> skipped
    if res is None:
        raise AutoIFSkip("returned None")
    try:
        v = int(res)
    except Exception:
        raise AutoIFSkip("int() failed on " + type(res).__name__)
    if v == 1:
        return True
    if v == 0:
        return False
    return v  # any other int counts as itself in AutoIF's mean; the sandbox reports "returned int N"
'''


def autoif_wrapped(src: str) -> str:
    """A sandbox function that behaves as AutoIF's script does with ``src``: the source is ``exec``-ed with
    separate globals and locals (so a helper function or a module-level import is invisible inside
    ``evaluate``, a NameError), and the return value goes through ``int(res)``; True/1 come back as pass,
    False/0 as fail, another int as itself, and every call AutoIF skips (exception, timeout, None, a value
    ``int()`` rejects such as "true") as an error."""
    return _WRAPPER.format(src=src)


def script_globals_used(src: str) -> set[str]:
    """Names of AutoIF's script globals that ``src`` uses without defining them (static, nothing runs)."""
    import ast

    tree = ast.parse(src)
    bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    bound |= {(a.asname or a.name).split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
              for a in n.names}
    bound |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    bound |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments) for a in [*n.args, *n.kwonlyargs]}
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return (loaded - bound) & set(AUTOIF_SCRIPT_GLOBALS)


@dataclass
class AutoIFCall:
    value: int | None  # int(res), or None where AutoIF skips the call
    why: str = ""  # why it was skipped: the exception, "timeout", "returned None", "int() failed on str"


@dataclass
class AutoIFRow:
    acc: list[float]  # per response: mean of int(res) over the calls not skipped, 0 when all were skipped
    calls: list[list[AutoIFCall]]  # per response, per loaded function
    dropped_funcs: list[int] = field(default_factory=list)  # functions whose exec failed (1_dpo_rft_wash skips them)


def _autoif_call(res) -> AutoIFCall:
    from autoif.sandbox import Outcome

    if res.outcome is Outcome.passed:
        return AutoIFCall(1)
    if res.outcome is Outcome.failed:
        return AutoIFCall(0)
    if res.outcome is Outcome.invalid_return:
        m = re.fullmatch(r"returned int (-?\d+)", res.detail)
        if m is None:
            raise AssertionError(f"unexpected sandbox detail for AutoIF's int(res): {res.detail!r}")
        return AutoIFCall(int(m.group(1)))
    if res.outcome is Outcome.error:
        return AutoIFCall(None, res.detail.removeprefix("AutoIFSkip: "))
    return AutoIFCall(None, res.outcome.value)  # timeout, killed


def autoif_pass_rates(rows: list[dict], sandbox, exec_failure_skips: bool) -> list[AutoIFRow]:
    """AutoIF's per-response ``acc`` of each row (7_query_vertification.py / 1_dpo_rft_wash.py), every call in
    ``sandbox``. ``exec_failure_skips``: 1_dpo_rft_wash.py skips a function whose exec fails, while
    7_query_vertification.py stops (raised here)."""
    from autoif.sandbox import Outcome

    out = []
    for n, row in enumerate(rows):
        srcs = [autoif_wrapped(src) for src, _ in row["eval_func"]]
        responses = row["gpt-answer"]
        grid = sandbox.run(srcs, responses)
        by = {(r.func_index, r.input_index): r for r in grid}
        loaded = [i for i in range(len(srcs)) if by[i, 0].outcome is not Outcome.compile_error]
        dropped = [i for i in range(len(srcs)) if i not in loaded]
        if dropped and not exec_failure_skips:
            raise RuntimeError(f"row {n}: AutoIF's script stops here, exec failed: {by[dropped[0], 0].detail}")
        calls = [[_autoif_call(by[i, j]) for i in loaded] for j in range(len(responses))]
        acc = [float(np.mean(v)) if (v := [c.value for c in cs if c.value is not None]) else 0.0 for cs in calls]
        out.append(AutoIFRow(acc=acc, calls=calls, dropped_funcs=dropped))
    return out


def autoif_query(prompt: str) -> str:
    return re.findall(r"\[Query\](.*)$", prompt, re.DOTALL)[0].strip()


def autoif_verification(rows: list[dict], rates: list[AutoIFRow]) -> tuple[list[int], list[dict]]:
    """(kept responses per row, the rows 7_query_vertification.py writes after its deduplication)."""
    kept_per_row, samples = [], []
    for row, r in zip(rows, rates):
        kept = [resp for resp, acc in zip(row["gpt-answer"], r.acc) if acc > 0]
        kept_per_row.append(len(kept))
        samples += [{"instruction": row["instruction"], "query": autoif_query(row["prompt"]), "response": k} for k in kept]
    return kept_per_row, list(map(json.loads, dict.fromkeys(map(json.dumps, samples))))  # set(), order kept


def autoif_score(gen: list[str]) -> float:
    scores = [int(m[0]) for each in gen if (m := re.findall(r"Score: (\d+?)$", each))]
    return float(np.mean(scores)) if scores else 0.0


def autoif_score_filter(rows: list[dict]) -> list[bool]:
    return [autoif_score(r["gen"]) > 8 for r in rows]


def autoif_wash(rows: list[dict], rates: list[AutoIFRow]) -> list[dict]:
    """1_dpo_rft_wash.py's eval_score_results rows (before its JSON-string deduplication)."""
    return [{"query": row["prompt"], "response": [[t, a] for t, a in zip(row["gpt-answer"], r.acc)]}
            for row, r in zip(rows, rates)]


@dataclass
class AutoIFPairs:
    positive: int
    negative: int
    branch: str  # "2x2", "1x1" or "skipped"
    pairs: list[tuple[str, str]]


def autoif_pairs(rows: list[dict], rng: random.Random) -> list[AutoIFPairs]:
    """2_dpo_data_query_construct.py on eval_score_results rows, ``rng`` in place of the unseeded ``random``."""
    out = []
    for data in rows:
        pos = [c[0] for c in data["response"] if c[1] >= 0.5]
        neg = [c[0] for c in data["response"] if c[1] == 0]
        if len(pos) >= 2 or len(neg) >= 2:
            branch, k = "2x2", 2
        elif len(pos) >= 1 or len(neg) >= 1:
            branch, k = "1x1", 1
        else:
            out.append(AutoIFPairs(len(pos), len(neg), "skipped", []))
            continue
        ps, ns = rng.sample(pos, min(k, len(pos))), rng.sample(neg, min(k, len(neg)))
        out.append(AutoIFPairs(len(pos), len(neg), branch, sorted(set(itertools.product(ps, ns)))))
    return out


def autoif_pair_count_range(rows: list[dict]) -> tuple[int, int]:
    counts = [sum(len(p.pairs) for p in autoif_pairs(rows, random.Random(s))) for s in AUTOIF_SEEDS]
    return min(counts), max(counts)


# ============================================================================================================
# Ours: the project's steps on frames built from the sample files
# ============================================================================================================


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def split_prompt(prompt: str) -> tuple[str, str]:
    """The DPO files hold only "<instruction>. <query>": the first sentence is the instruction."""
    head, _, query = prompt.partition(". ")
    return head + ".", query


def response_frame(items: list[tuple[str, str, list[str], list[str]]]) -> pd.DataFrame:
    """Rows in RESPONSE_COLUMNS from (instruction, query, function sources, responses), one pair per item."""
    from autoif.tasks.ids import instruction_id
    from autoif.tasks.query_augmentation import response_prompt
    from autoif.tasks.response_generation import RESPONSE_COLUMNS
    from autoif.tasks.stage_b_instructions import func_id

    rows = []
    for n, (instruction, query, funcs, responses) in enumerate(items):
        pair_id = f"p{n:02d}"
        base = {"pair_id": pair_id, "instruction_id": instruction_id(instruction), "instruction": instruction,
                "family": "autoif-sample", "funcs": json.dumps(funcs), "func_ids": json.dumps([func_id(f) for f in funcs]),
                "verifier_source": "synthesized", "query_id": _hash(query), "query": query,
                "prompt": response_prompt(instruction, query)}
        for k, text in enumerate(responses):  # as response generation writes them: ids "<pair>-<k>", text stripped
            text = text.strip()
            rows.append({**base, "response_id": f"{pair_id}-{k}", "response_index": k, "response": text,
                         "reason": None if text else "empty_response"})
    return pd.DataFrame(rows, columns=RESPONSE_COLUMNS)


def rft_items(rows: list[dict]) -> list[tuple[str, str, list[str], list[str]]]:
    return [(r["instruction"], autoif_query(r["prompt"]), [f for f, _ in r["eval_func"]], r["gpt-answer"]) for r in rows]


def dpo_items(rows: list[dict]) -> list[tuple[str, str, list[str], list[str]]]:
    return [(*split_prompt(r["prompt"]), [f for f, _ in r["eval_func"]], r["gpt-answer"]) for r in rows]


def our_verification(responses: pd.DataFrame, cfg, sandbox) -> pd.DataFrame:
    from autoif.flows.steps import verify_responses

    kept = responses[responses["reason"].isna()]  # the flow verifies only kept responses
    return verify_responses.pure(responses=kept, cfg=cfg.verification, sandbox=sandbox)


def our_score_filter(rows: list[dict], cfg) -> pd.DataFrame:
    """The judged rows as verified responses (they passed AutoIF's verification), scored by our step with the
    judge outputs of the file as the engine's answers."""
    from autoif.flows.steps import score_responses
    from autoif.llm.scripted import ScriptedLLM
    from autoif.tasks.quality_filter import score_prompt
    from autoif.tasks.verification import VERIFIED_COLUMNS

    frame = response_frame([(r["instruction"], r["query"], [], [r["response"]]) for r in rows])
    frame = frame.assign(pass_rate=1.0, n_funcs=0, n_passed=0, n_errors=0, n_timeouts=0, func_results="[]")
    frame = frame[VERIFIED_COLUMNS]
    llm = ScriptedLLM.from_prompts({score_prompt(r["instruction"], r["query"], r["response"]): r["gen"] for r in rows})
    return score_responses.pure(verified=frame, llm=llm, cfg=cfg.quality_filter, seed=0)


def clean_of(verified: pd.DataFrame) -> pd.DataFrame:
    """What the contamination step hands to the pairing: the kept responses, scored. The DPO sample has no
    judge outputs (AutoIF's DPO scripts never score), so every kept response counts as passing the score
    filter, with score 10."""
    kept = verified[verified["reason"].isna()]
    return kept.assign(score=10.0, score_analysis="", contaminated_fields=None)


def our_pairs(verified: pd.DataFrame, cfg) -> pd.DataFrame:
    from autoif.flows.steps import query_dpo

    return query_dpo.pure(verified=verified, clean=clean_of(verified), cfg=cfg.pairs)


def verified_from_rates(rows: list[dict], cfg) -> pd.DataFrame:
    """``dpo_query_eval_score_results.jsonl`` (no functions, AutoIF's pass rates) as our verification's
    output: the same pass rates, our verification threshold decides the reason."""
    from autoif.tasks.verification import VERIFIED_COLUMNS

    frame = response_frame([(*split_prompt(r["query"]), [], [t for t, _ in r["response"]]) for r in rows])
    rates = [float(a) for r in rows for _, a in r["response"]]
    frame = frame.assign(pass_rate=rates, n_funcs=1, n_passed=[int(a == 1.0) for a in rates], n_errors=0, n_timeouts=0,
                         func_results="[]")
    frame["reason"] = [None if cfg.verification.pass_rate.holds(a) else "low_pass_rate" for a in rates]
    return frame[VERIFIED_COLUMNS]


# ============================================================================================================
# The replay
# ============================================================================================================


@dataclass
class Replay:
    rft: list[dict]
    rft_autoif: list[AutoIFRow]
    rft_autoif_kept: list[int]
    rft_autoif_samples: list[dict]
    rft_ours: dict[str, pd.DataFrame]  # preset -> verified
    score_rows: list[dict]
    score_filter_file: list[dict]
    score_autoif: list[bool]
    score_ours: dict[str, pd.DataFrame]  # preset -> scored
    dpo_funcs: list[dict]
    dpo_funcs_autoif: list[AutoIFRow]
    dpo_funcs_autoif_pairs: list[AutoIFPairs]
    dpo_funcs_ours: dict[str, pd.DataFrame]  # preset -> verified
    dpo_funcs_ours_pairs: dict[str, pd.DataFrame]  # preset -> DPO pairs
    dpo_rates: list[dict]
    dpo_rates_autoif_pairs: list[AutoIFPairs]
    dpo_rates_autoif_range: tuple[int, int]
    dpo_rates_ours_pairs: dict[str, pd.DataFrame]  # preset -> DPO pairs


def replay(root: Path = SAMPLE_DIR) -> Replay:
    from autoif.config import load_config
    from autoif.sandbox import Sandbox

    cfgs = {p: load_config(preset=p) for p in ("code", "paper")}
    rft, dpo_funcs = load("query_rft.jsonl", root), load("dpo_query_w_funcs.jsonl", root)
    # AutoIF's side: its own per-call limits (signal.alarm(5) / (3)), every call made (no timeout cap)
    with Sandbox(timeout_s=5.0, max_timeouts_per_func=None) as sb:
        rft_autoif = autoif_pass_rates(rft, sb, exec_failure_skips=False)
    with Sandbox(timeout_s=3.0, max_timeouts_per_func=None) as sb:
        dpo_funcs_autoif = autoif_pass_rates(dpo_funcs, sb, exec_failure_skips=True)
    kept, samples = autoif_verification(rft, rft_autoif)
    vcfg = cfgs["code"].verification  # timeout and workers are the same in both presets
    rft_ours, dpo_funcs_ours = {}, {}
    with Sandbox(workers=vcfg.sandbox_workers, timeout_s=vcfg.timeout_s) as sb:
        for p, cfg in cfgs.items():
            rft_ours[p] = our_verification(response_frame(rft_items(rft)), cfg, sb)
            dpo_funcs_ours[p] = our_verification(response_frame(dpo_items(dpo_funcs)), cfg, sb)
    score_rows = load("query_rft_score.jsonl", root)
    dpo_rates = load("dpo_query_eval_score_results.jsonl", root)
    return Replay(
        rft=rft, rft_autoif=rft_autoif, rft_autoif_kept=kept, rft_autoif_samples=samples, rft_ours=rft_ours,
        score_rows=score_rows, score_filter_file=load("query_score_filter.jsonl", root),
        score_autoif=autoif_score_filter(score_rows), score_ours={p: our_score_filter(score_rows, c) for p, c in cfgs.items()},
        dpo_funcs=dpo_funcs, dpo_funcs_autoif=dpo_funcs_autoif,
        dpo_funcs_autoif_pairs=autoif_pairs(autoif_wash(dpo_funcs, dpo_funcs_autoif), random.Random(AUTOIF_SEED)),
        dpo_funcs_ours=dpo_funcs_ours, dpo_funcs_ours_pairs={p: our_pairs(v, cfgs[p]) for p, v in dpo_funcs_ours.items()},
        dpo_rates=dpo_rates, dpo_rates_autoif_pairs=autoif_pairs(dpo_rates, random.Random(AUTOIF_SEED)),
        dpo_rates_autoif_range=autoif_pair_count_range(dpo_rates),
        dpo_rates_ours_pairs={p: our_pairs(verified_from_rates(dpo_rates, c), c) for p, c in cfgs.items()},
    )


def kept_per_pair(frame: pd.DataFrame, n: int) -> list[int]:
    counts = frame[frame["reason"].isna()].groupby("pair_id").size()
    return [int(counts.get(f"p{i:02d}", 0)) for i in range(n)]


def pairs_per_prompt(dpo: pd.DataFrame, verified: pd.DataFrame) -> list[str]:
    """Per prompt (pair_id order): "N pairs" or the reason of its dropped row."""
    by_prompt = dict(zip(verified.drop_duplicates("pair_id")["prompt"], verified.drop_duplicates("pair_id")["pair_id"]))
    from autoif.tasks.training_data import training_prompt

    out = []
    for pid, g in verified.groupby("pair_id", sort=True):
        first = g.iloc[0]
        rows = dpo[dpo["prompt"] == training_prompt(first["query"], first["instruction"])]
        kept = rows[rows["reason"].isna()]
        out.append(f"{len(kept)} pairs" if len(kept) else str(rows["reason"].iloc[0]))
    del by_prompt
    return out


def _skip_reasons(calls: list[list[AutoIFCall]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for cs in calls:
        for c in cs:
            if c.value is None:
                key = c.why.split(":")[0] if c.why.startswith(("NameError", "IndexError", "ValueError")) else c.why
                out[key] = out.get(key, 0) + 1
    return out


def _outcomes(verified: pd.DataFrame) -> dict[str, int]:
    out: dict[str, int] = {}
    for cell in verified["func_results"]:
        for p in json.loads(cell):
            out[p["outcome"]] = out.get(p["outcome"], 0) + 1
    return out


def _rates(values) -> str:
    return " ".join(f"{v:g}" for v in values)


def tables(r: Replay) -> str:
    n = len(r.rft)
    code_kept, paper_kept = kept_per_pair(r.rft_ours["code"], n), kept_per_pair(r.rft_ours["paper"], n)
    out = ["## 1. Verification (`query_rft.jsonl`, 16 responses per row)", "",
           "| # | instruction | funcs | AutoIF acc per response | AutoIF kept (acc > 0) | ours pass rate per response | ours kept code (> 0) | ours kept paper (> 0.5) |",
           "|---|---|---|---|---|---|---|---|"]
    for i, (row, a) in enumerate(zip(r.rft, r.rft_autoif)):
        ours = r.rft_ours["code"][r.rft_ours["code"]["pair_id"] == f"p{i:02d}"]["pass_rate"].tolist()
        out.append(f"| {i} | {row['instruction'][:40]} | {len(row['eval_func'])} | {_rates(a.acc)} | {r.rft_autoif_kept[i]} | "
                   f"{_rates(ours)} | {code_kept[i]} | {paper_kept[i]} |")
    out += ["", f"AutoIF skipped calls: {_skip_reasons([c for a in r.rft_autoif for c in a.calls])}; "
            f"our outcomes: {_outcomes(r.rft_ours['code'])}", ""]

    out += ["## 2. Score filter (`query_rft_score.jsonl`)", "",
            "| # | judge's last line | AutoIF score -> kept (> 8) | in query_score_filter.jsonl | ours score | ours kept code (> 8) | ours kept paper (>= 8) |",
            "|---|---|---|---|---|---|---|"]
    in_file = [row in r.score_filter_file for row in r.score_rows]
    for i, row in enumerate(r.score_rows):
        c, p = r.score_ours["code"].iloc[i], r.score_ours["paper"].iloc[i]
        out.append(f"| {i} | `{row['gen'][0].strip().splitlines()[-1]}` | {autoif_score(row['gen']):g} -> {r.score_autoif[i]} | "
                   f"{in_file[i]} | {c['score']:g} | {pd.isna(c['reason'])} | {pd.isna(p['reason'])} |")
    out.append("")

    out += ["## 3a. DPO from functions (`dpo_query_w_funcs.jsonl`, 8 responses, 1 function)", "",
            "| # | query | AutoIF wash acc | AutoIF pos / neg -> pairs | ours pass rate | ours code | ours paper |",
            "|---|---|---|---|---|---|---|"]
    v = r.dpo_funcs_ours["code"]
    ours_code = pairs_per_prompt(r.dpo_funcs_ours_pairs["code"], v)
    ours_paper = pairs_per_prompt(r.dpo_funcs_ours_pairs["paper"], r.dpo_funcs_ours["paper"])
    for i, (row, a, ap) in enumerate(zip(r.dpo_funcs, r.dpo_funcs_autoif, r.dpo_funcs_autoif_pairs)):
        ours = v[v["pair_id"] == f"p{i:02d}"]["pass_rate"].tolist()
        out.append(f"| {i} | {split_prompt(row['prompt'])[1][:40]} | {_rates(a.acc)} | {ap.positive} / {ap.negative} -> "
                   f"{len(ap.pairs)} | {_rates(ours)} | {ours_code[i]} | {ours_paper[i]} |")
    out += ["", f"AutoIF skipped calls: {_skip_reasons([c for a in r.dpo_funcs_autoif for c in a.calls])}; "
            f"our outcomes: {_outcomes(v)}", ""]

    out += ["## 3b. DPO from AutoIF's pass rates (`dpo_query_eval_score_results.jsonl`)", "",
            "| # | prompt | pass rates | AutoIF pos / neg -> branch -> pairs | ours code | ours paper |",
            "|---|---|---|---|---|---|"]
    for p in ("code", "paper"):
        assert len(r.dpo_rates_ours_pairs[p])  # noqa: S101
    from autoif.config import load_config

    vr = {p: verified_from_rates(r.dpo_rates, load_config(preset=p)) for p in ("code", "paper")}
    oc, op = pairs_per_prompt(r.dpo_rates_ours_pairs["code"], vr["code"]), pairs_per_prompt(r.dpo_rates_ours_pairs["paper"], vr["paper"])
    for i, (row, ap) in enumerate(zip(r.dpo_rates, r.dpo_rates_autoif_pairs)):
        out.append(f"| {i} | {row['query'][:40]} | {_rates(a for _, a in row['response'])} | {ap.positive} / {ap.negative} -> "
                   f"{ap.branch} -> {len(ap.pairs)} | {oc[i]} | {op[i]} |")
    return "\n".join(out)


def metrics(r: Replay) -> dict[str, float]:
    n = len(r.rft)
    out: dict[str, float] = {
        "verification.responses": float(sum(len(x["gpt-answer"]) for x in r.rft)),
        "verification.kept.autoif": float(sum(r.rft_autoif_kept)),
        "verification.kept.autoif_dedup": float(len(r.rft_autoif_samples)),
        "verification.kept.ours": float(sum(kept_per_pair(r.rft_ours["code"], n))),
        "verification.kept.ours_paper": float(sum(kept_per_pair(r.rft_ours["paper"], n))),
        "verification.calls_skipped.autoif": float(sum(c.value is None for a in r.rft_autoif for cs in a.calls for c in cs)),
        "verification.calls_error.ours": float(r.rft_ours["code"]["n_errors"].sum()),
        "verification.calls_timeout.ours": float(r.rft_ours["code"]["n_timeouts"].sum()),
        "score_filter.rows": float(len(r.score_rows)),
        "score_filter.kept.autoif": float(sum(r.score_autoif)),
        "score_filter.kept.autoif_file": float(len(r.score_filter_file)),
        "score_filter.kept.ours": float(r.score_ours["code"]["reason"].isna().sum()),
        "score_filter.kept.ours_paper": float(r.score_ours["paper"]["reason"].isna().sum()),
    }
    for name, ap, ours in (("dpo_funcs", r.dpo_funcs_autoif_pairs, r.dpo_funcs_ours_pairs),
                           ("dpo", r.dpo_rates_autoif_pairs, r.dpo_rates_ours_pairs)):
        out[f"{name}.prompts"] = float(len(ap))
        out[f"{name}.pairs.autoif"] = float(sum(len(p.pairs) for p in ap))
        out[f"{name}.prompts_with_pairs.autoif"] = float(sum(bool(p.pairs) for p in ap))
        out[f"{name}.prompts_skipped.autoif"] = float(sum(p.branch == "skipped" for p in ap))
        out[f"{name}.prompts_without_rejected.autoif"] = float(sum(p.branch != "skipped" and p.negative == 0 for p in ap))
        out[f"{name}.prompts_without_chosen.autoif"] = float(sum(p.branch != "skipped" and p.positive == 0 for p in ap))
        out[f"{name}.pairs_missing_a_side.autoif"] = float(sum(not a or not b for p in ap for a, b in p.pairs))
        for preset, dpo in ours.items():
            suffix = "" if preset == "code" else "_paper"
            out[f"{name}.pairs.ours{suffix}"] = float(dpo["reason"].isna().sum())
            out[f"{name}.prompts_with_pairs.ours{suffix}"] = float(dpo[dpo["reason"].isna()]["prompt"].nunique())
            for reason in ("no_chosen", "no_rejected"):
                out[f"{name}.prompts_{reason}.ours{suffix}"] = float((dpo["reason"] == reason).sum())
    out["dpo.pairs.autoif_min_over_seeds"], out["dpo.pairs.autoif_max_over_seeds"] = map(float, r.dpo_rates_autoif_range)
    return out


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else SAMPLE_DIR
    r = replay(root)
    print(tables(r))
    print()
    for k, v in metrics(r).items():
        print(f"{k} = {v:g}")


if __name__ == "__main__":
    main()
