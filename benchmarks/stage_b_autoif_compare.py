"""Side by side with AutoIF on its own data, stage B (acceptance point 10 of issue 10).

AutoIF's published sample files (``tests/data/autoif-sample/``, Apache-2.0, LICENSE beside them) replayed
through our steps and through the filter logic of AutoIF's published scripts (QwenLM/AutoIF, commit d67b9ba),
restated below apart from ours:

1. verification, ``query_rft.jsonl`` (20 query + instruction rows x 16 responses, 2-3 functions each): our
   ``verify_responses`` (code preset: pass rate > 0; paper: > 0.5) vs ``code/7_query_vertification.py``;
2. score filter, ``query_rft_score.jsonl`` (20 judged responses): our ``score_responses`` on the file's judge
   outputs (code: > 8; paper: >= 8) vs ``code/8_query_score_filiter.py``, both vs ``query_score_filter.jsonl``
   (the 16 rows AutoIF kept);
3. query-level DPO pairs: (a) ``dpo_query_w_funcs.jsonl`` (21 prompts x 8 responses, one function) through our
   verification and ``query_dpo`` vs ``code_dpo/1_dpo_rft_wash.py`` + ``code_dpo/2_dpo_data_query_construct.py``;
   (b) ``dpo_query_eval_score_results.jsonl`` (20 prompts x 8 responses with AutoIF's pass rates: the input
   of AutoIF's pairing script; a different instruction set from (a)) through our ``query_dpo`` vs that script;
4. probes: a few responses and judge outputs (ours, not AutoIF's data) on the sample's functions, where the
   two rule sets part; the sample itself never reaches those cases for a kept/dropped decision.

Every generated function runs in our sandbox, AutoIF's side too (its ``exec`` semantics are reproduced inside
the sandbox, see :func:`autoif_wrapped`); nothing generated runs in this process.

    python benchmarks/stage_b_autoif_compare.py        # markdown tables, then `name = value` lines
"""
from __future__ import annotations

import ast
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
PRESETS = ("code", "paper")
AUTOIF_SEED = 0  # AutoIF's pairing script never seeds `random`; the restatement does, so a run is reproducible
AUTOIF_SEEDS = range(200)  # the pairing script's pair count over these seeds (duplicate texts make it vary)


def load(name: str, root: Path = SAMPLE_DIR) -> list[dict]:
    return [json.loads(line) for line in (root / name).read_text().splitlines() if line.strip()]


# ============================================================================================================
# AutoIF's published logic, restated (for the comparison only; not the project's code)
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
#     if len(positive) >= 2 or len(negative) >= 2: random.sample min(2, n) of each side
#     elif len(positive) >= 1 or len(negative) >= 1: random.sample min(1, n) of each side
#     else: continue (the row is skipped)
#     write one pair per element of set(itertools.product(positive_samples, negative_samples))
# ============================================================================================================

# 7_query_vertification.py's module-level names: `exec(func, globals(), ...)` hands them to every function,
# so a function may use them without an import. Our sandbox provides the four it allows (re, json, random,
# copy); no function of the sample uses any of the others (`script_globals_used` checks).
AUTOIF_SCRIPT_GLOBALS = ("jsonlines", "json", "random", "re", "os", "copy", "nltk", "np", "time", "retry",
                         "stop_after_attempt", "wait_random_exponential", "RetryError", "logging", "signal", "tqdm",
                         "requests", "ThreadPoolExecutor", "TimeoutError")

_WRAPPER = '''
import copy, json, random, re
_G = {{"__builtins__": __builtins__, "__name__": "__main__", "copy": copy, "json": json, "random": random, "re": re}}
_L = {{}}
exec({src!r}, _G, _L)  # AutoIF: exec(func, globals(), local_vars); top-level defs and imports land in _L
_evaluate = _L["evaluate"]


class AutoIFSkip(Exception):
    pass


def evaluate(response):
    res = _evaluate(response)  # AutoIF: an exception (or the alarm) -> res = None -> skipped
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
    return v  # another int counts as itself in AutoIF's mean; the sandbox reports "returned int N"
'''


def autoif_wrapped(src: str) -> str:
    """A sandbox function that behaves as AutoIF's script does with ``src``: the source is ``exec``-ed with
    separate globals and locals (a helper function or a module-level import is then invisible inside
    ``evaluate``: NameError), and the return value goes through ``int(res)``; True/1 come back as pass,
    False/0 as fail, another int as itself, and every call AutoIF skips (exception, timeout, None, a value
    ``int()`` rejects such as "true") as an error."""
    return _WRAPPER.format(src=src)


def script_globals_used(src: str) -> set[str]:
    """Names of 7_query_vertification.py's globals that ``src`` uses without binding them (static)."""
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
    acc: list[float]  # per response: mean of int(res) over the calls not skipped; 0 when all were skipped
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
            raise RuntimeError(f"unexpected sandbox detail for AutoIF's int(res): {res.detail!r}")
        return AutoIFCall(int(m.group(1)))
    if res.outcome is Outcome.error:
        return AutoIFCall(None, res.detail.removeprefix("AutoIFSkip: "))
    return AutoIFCall(None, res.outcome.value)  # timeout, killed


def autoif_pass_rates(rows: list[dict], sandbox, exec_failure_skips: bool) -> list[AutoIFRow]:
    """AutoIF's per-response ``acc`` of each ``{"eval_func", "gpt-answer"}`` row, every call in ``sandbox``.
    ``exec_failure_skips``: 1_dpo_rft_wash.py skips a function whose exec fails; 7_query_vertification.py
    stops (raised here)."""
    from autoif.sandbox import Outcome

    out = []
    for n, row in enumerate(rows):
        srcs = [autoif_wrapped(src) for src, _ in row["eval_func"]]
        responses = row["gpt-answer"]
        by = {(r.func_index, r.input_index): r for r in sandbox.run(srcs, responses)}
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
    return kept_per_row, list(map(json.loads, dict.fromkeys(map(json.dumps, samples))))  # its set(), in order


def autoif_score(gen: list[str]) -> float:
    scores = [int(m[0]) for each in gen if (m := re.findall(r"Score: (\d+?)$", each))]
    return float(np.mean(scores)) if scores else 0.0


def autoif_score_kept(gen: list[str]) -> bool:
    return autoif_score(gen) > 8


def autoif_wash(rows: list[dict], rates: list[AutoIFRow]) -> list[dict]:
    """1_dpo_rft_wash.py's eval_score_results rows, after its JSON-string deduplication (order kept)."""
    washed = [{"query": row["prompt"], "response": [[t, a] for t, a in zip(row["gpt-answer"], r.acc)]}
              for row, r in zip(rows, rates)]
    return list(map(json.loads, dict.fromkeys(map(json.dumps, washed))))


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


def autoif_pair_counts(rows: list[dict]) -> list[int]:
    return [sum(len(p.pairs) for p in autoif_pairs(rows, random.Random(s))) for s in AUTOIF_SEEDS]


# ============================================================================================================
# Ours: the project's steps, on frames built from the sample files
# ============================================================================================================


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def pair_id(n: int) -> str:
    return f"p{n:02d}"


def split_prompt(prompt: str) -> tuple[str, str]:
    """The DPO files hold only "<instruction>. <query>": the first sentence is the instruction."""
    head, _, query = prompt.partition(". ")
    return head + ".", query


def response_frame(items: list[tuple[str, str, list[str], list[str]]]) -> pd.DataFrame:
    """Response generation's output (RESPONSE_COLUMNS) for (instruction, query, function sources, responses)
    items, one (instruction, query) pair per item, ids ``p<NN>`` / ``p<NN>-<k>``."""
    from autoif.tasks.ids import instruction_id
    from autoif.tasks.query_augmentation import response_prompt
    from autoif.tasks.response_generation import RESPONSE_COLUMNS
    from autoif.tasks.stage_b_instructions import func_id

    rows = []
    for n, (instruction, query, funcs, responses) in enumerate(items):
        base = {"pair_id": pair_id(n), "instruction_id": instruction_id(instruction), "instruction": instruction,
                "family": "autoif-sample", "funcs": json.dumps(funcs), "func_ids": json.dumps([func_id(f) for f in funcs]),
                "verifier_source": "synthesized", "query_id": _hash(query), "query": query,
                "prompt": response_prompt(instruction, query)}
        for k, text in enumerate(responses):  # as response generation writes them: text stripped, empty dropped
            text = text.strip()
            rows.append({**base, "response_id": f"{pair_id(n)}-{k}", "response_index": k, "response": text,
                         "reason": None if text else "empty_response"})
    return pd.DataFrame(rows, columns=RESPONSE_COLUMNS)


def rft_items(rows: list[dict]) -> list[tuple[str, str, list[str], list[str]]]:
    return [(r["instruction"], autoif_query(r["prompt"]), [f for f, _ in r["eval_func"]], r["gpt-answer"]) for r in rows]


def dpo_items(rows: list[dict]) -> list[tuple[str, str, list[str], list[str]]]:
    return [(*split_prompt(r["prompt"]), [f for f, _ in r["eval_func"]], r["gpt-answer"]) for r in rows]


def our_verification(responses: pd.DataFrame, cfg, sandbox) -> pd.DataFrame:
    from autoif.flows.steps import verify_responses

    kept = responses[responses["reason"].isna()]  # the flow verifies the kept responses only
    return verify_responses.pure(responses=kept, cfg=cfg.verification, sandbox=sandbox)


def our_score_filter(rows: list[dict], cfg) -> pd.DataFrame:
    """The judged rows as verified responses (they passed AutoIF's verification), scored by our step with the
    file's judge outputs as the engine's answers."""
    from autoif.flows.steps import score_responses
    from autoif.tasks.quality_filter import score_prompt
    from autoif.tasks.verification import VERIFIED_COLUMNS

    from autoif.llm.scripted import ScriptedLLM

    frame = response_frame([(r["instruction"], r["query"], [], [r["response"]]) for r in rows])
    frame = frame.assign(pass_rate=1.0, n_funcs=0, n_passed=0, n_errors=0, n_timeouts=0, func_results="[]")[VERIFIED_COLUMNS]
    frame = frame.assign(contaminated_fields=None)  # as the contamination step hands them on
    llm = ScriptedLLM.from_prompts({score_prompt(r["instruction"], r["query"], r["response"]): r["gen"] for r in rows})
    return score_responses.pure(clean=frame, llm=llm, cfg=cfg.quality_filter, seed=0)


def clean_of(verified: pd.DataFrame) -> pd.DataFrame:
    """What the quality filter hands the pairing: kept responses, scored. The DPO samples carry no judge
    outputs (AutoIF's DPO scripts never score), so every kept response passes the score filter (score 10)."""
    kept = verified[verified["reason"].isna()]
    return kept.assign(score=10.0, score_analysis="", contaminated_fields=None)


def our_pairs(verified: pd.DataFrame, cfg) -> pd.DataFrame:
    from autoif.flows.steps import query_dpo

    return query_dpo.pure(verified=verified, clean=clean_of(verified), cfg=cfg.pairs)


def verified_from_rates(rows: list[dict], cfg) -> pd.DataFrame:
    """``dpo_query_eval_score_results.jsonl`` (AutoIF's pass rates, no functions) as our verification's output:
    the same pass rates; our verification threshold sets the reason."""
    from autoif.tasks.verification import VERIFIED_COLUMNS

    frame = response_frame([(*split_prompt(r["query"]), [], [t for t, _ in r["response"]]) for r in rows])
    rates = [float(a) for r in rows for _, a in r["response"]]
    frame = frame.assign(pass_rate=rates, n_funcs=1, n_passed=[int(a == 1.0) for a in rates], n_errors=0, n_timeouts=0,
                         func_results="[]")
    frame["reason"] = [None if cfg.verification.pass_rate.holds(a) else "low_pass_rate" for a in rates]
    return frame[VERIFIED_COLUMNS]


def per_pair(frame: pd.DataFrame, column: str) -> list[list]:
    return [g[column].tolist() for _, g in frame.groupby("pair_id", sort=True)]


def kept_per_pair(verified: pd.DataFrame) -> list[int]:
    return [int(g["reason"].isna().sum()) for _, g in verified.groupby("pair_id", sort=True)]


def pairs_per_prompt(dpo: pd.DataFrame) -> list[str]:
    """Per prompt, in pair order: "N" (pairs written) or the reason of its one dropped row."""
    out = []
    for _, g in dpo.groupby("prompt", sort=False):
        kept = g[g["reason"].isna()]
        out.append(str(len(kept)) if len(kept) else str(g["reason"].iloc[0]))
    return out


def distinct_pairs(dpo: pd.DataFrame) -> int:
    kept = dpo[dpo["reason"].isna()]
    return len(set(zip(kept["prompt"], kept["chosen"], kept["rejected"])))


# ============================================================================================================
# Probes (ours, not AutoIF's data): the sample's own functions on responses that reach the cases where the
# two rule sets part, and judge outputs AutoIF's regex and our parser read differently
# ============================================================================================================

PROBE_TIMEOUT_S = 1.0
LOOPS = "def evaluate(response):\n    while True:\n        pass\n"  # a function that never returns
WORD_COUNT = "def evaluate(response):\n    return len(response.split())\n"  # returns an int that is not 0/1


def probes(rft: list[dict], dpo_funcs: list[dict]) -> list[dict]:
    syllables, vowels = (f for f, _ in rft[0]["eval_func"])  # count_syllables helper / 4 vowels per word
    primes = dpo_funcs[0]["eval_func"][0][0]  # returns 'true' / 'false'
    return [
        {"name": "helper_function", "funcs": [syllables, vowels], "response": "information",
         "why": "count_syllables is a module-level helper: NameError under AutoIF's exec, skipped; ours runs it"},
        {"name": "helper_function_inflates", "funcs": [syllables, vowels], "response": "queue",
         "why": "the failing helper-based function is skipped by AutoIF, so the rate is over the other one only"},
        {"name": "string_true", "funcs": [primes], "response": "2, 3, 5, 7",
         "why": "'true' is a pass for us; int('true') raises, AutoIF skips it, and no value means acc 0"},
        {"name": "timeout", "funcs": [LOOPS, vowels], "response": "queue",
         "why": "a timeout is a fail for us; AutoIF's alarm raises, the call is skipped"},
        {"name": "int_return", "funcs": [WORD_COUNT], "response": "one two three",
         "why": "an int other than 0/1 is an invalid return (fail) for us; AutoIF averages int(3) = 3"},
    ]


SCORE_PROBES = [  # judge outputs: (name, text)
    ("trailing_period", "Relevant and helpful.\nScore: 9."),
    ("bold", "Relevant and helpful.\n**Score: 9**"),
    ("out_of_ten", "Relevant and helpful.\nScore: 9/10"),
    ("lowercase", "Relevant and helpful.\nscore: 9"),
    ("json", '{"analysis": "Relevant and helpful.", "score": 9}'),
    ("out_of_range", "Relevant and helpful.\nScore: 12"),
    ("no_score", "I cannot judge this response."),
    ("score_not_last", "Score: 9\nThe response is relevant."),
    ("json_in_analysis", 'The response prints {"score": 3, "done": true} as the query asks.\nScore: 9'),
]


def dpo_probe(dpo_funcs: list[dict]) -> dict:
    """One prompt of ``dpo_query_w_funcs.jsonl``'s instruction (its prime-number function) with a correct
    response, a correct one wrapped in text and a wrong one."""
    return {"prompt": "Write the response as a sequential list of prime numbers. Name a few primes.",
            "eval_func": dpo_funcs[0]["eval_func"], "gpt-answer": ["2, 3, 5, 7", "Sure: 2, 3, 5, 7", "2, 4, 6"]}


def probe_frame(items: list[dict]) -> pd.DataFrame:
    return response_frame([("probe instruction", p["name"], p["funcs"], [p["response"]]) for p in items])


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
    score_ours: dict[str, pd.DataFrame]  # preset -> scored
    dpo_funcs: list[dict]
    dpo_funcs_autoif: list[AutoIFRow]
    dpo_funcs_autoif_pairs: list[AutoIFPairs]
    dpo_funcs_ours: dict[str, pd.DataFrame]  # preset -> verified
    dpo_funcs_ours_pairs: dict[str, pd.DataFrame]  # preset -> DPO rows
    dpo_rates: list[dict]
    dpo_rates_autoif_pairs: list[AutoIFPairs]
    dpo_rates_autoif_counts: list[int]  # over AUTOIF_SEEDS
    dpo_rates_ours: dict[str, pd.DataFrame]  # preset -> verified (AutoIF's rates)
    dpo_rates_ours_pairs: dict[str, pd.DataFrame]  # preset -> DPO rows
    probes: list[dict]
    probes_autoif: list[AutoIFRow]
    probes_ours: dict[str, pd.DataFrame]  # preset -> verified
    dpo_probe: dict
    dpo_probe_autoif: AutoIFRow
    dpo_probe_autoif_pairs: AutoIFPairs
    dpo_probe_ours: pd.DataFrame  # verified, code preset
    dpo_probe_ours_pairs: pd.DataFrame


def replay(root: Path = SAMPLE_DIR) -> Replay:
    from autoif.config import load_config
    from autoif.sandbox import Sandbox

    cfgs = {p: load_config(preset=p) for p in PRESETS}
    rft, dpo_funcs = load("query_rft.jsonl", root), load("dpo_query_w_funcs.jsonl", root)
    score_rows, dpo_rates = load("query_rft_score.jsonl", root), load("dpo_query_eval_score_results.jsonl", root)
    pr, dp = probes(rft, dpo_funcs), dpo_probe(dpo_funcs)
    # AutoIF's side: its own per-call limits (signal.alarm(5) / (3)), every call made (no cap on timeouts)
    with Sandbox(timeout_s=5.0, max_timeouts_per_func=None) as sb:
        rft_autoif = autoif_pass_rates(rft, sb, exec_failure_skips=False)
    # the probes: a 1 s limit keeps the timeout probe short; to AutoIF any timeout is the same skipped call
    with Sandbox(timeout_s=PROBE_TIMEOUT_S, max_timeouts_per_func=None) as sb:
        probes_autoif = autoif_pass_rates([{"eval_func": [[f, None] for f in p["funcs"]], "gpt-answer": [p["response"]]}
                                           for p in pr], sb, exec_failure_skips=False)
    with Sandbox(timeout_s=3.0, max_timeouts_per_func=None) as sb:
        dpo_funcs_autoif = autoif_pass_rates(dpo_funcs, sb, exec_failure_skips=True)
        (dpo_probe_autoif,) = autoif_pass_rates([dp], sb, exec_failure_skips=True)
    kept, samples = autoif_verification(rft, rft_autoif)
    vcfg = cfgs["code"].verification  # timeout and workers: the same in both presets
    rft_ours, dpo_funcs_ours, probes_ours = {}, {}, {}
    with Sandbox(workers=vcfg.sandbox_workers, timeout_s=vcfg.timeout_s) as sb:  # what the flow's pool gets
        for p, cfg in cfgs.items():
            rft_ours[p] = our_verification(response_frame(rft_items(rft)), cfg, sb)
            dpo_funcs_ours[p] = our_verification(response_frame(dpo_items(dpo_funcs)), cfg, sb)
            probes_ours[p] = our_verification(probe_frame(pr), cfg, sb)
        dpo_probe_ours = our_verification(response_frame(dpo_items([dp])), cfgs["code"], sb)
    dpo_rates_ours = {p: verified_from_rates(dpo_rates, c) for p, c in cfgs.items()}
    return Replay(
        rft=rft, rft_autoif=rft_autoif, rft_autoif_kept=kept, rft_autoif_samples=samples, rft_ours=rft_ours,
        score_rows=score_rows, score_filter_file=load("query_score_filter.jsonl", root),
        score_ours={p: our_score_filter(score_rows, c) for p, c in cfgs.items()},
        dpo_funcs=dpo_funcs, dpo_funcs_autoif=dpo_funcs_autoif,
        dpo_funcs_autoif_pairs=autoif_pairs(autoif_wash(dpo_funcs, dpo_funcs_autoif), random.Random(AUTOIF_SEED)),
        dpo_funcs_ours=dpo_funcs_ours, dpo_funcs_ours_pairs={p: our_pairs(v, cfgs[p]) for p, v in dpo_funcs_ours.items()},
        dpo_rates=dpo_rates, dpo_rates_autoif_pairs=autoif_pairs(dpo_rates, random.Random(AUTOIF_SEED)),
        dpo_rates_autoif_counts=autoif_pair_counts(dpo_rates), dpo_rates_ours=dpo_rates_ours,
        dpo_rates_ours_pairs={p: our_pairs(v, cfgs[p]) for p, v in dpo_rates_ours.items()},
        probes=pr, probes_autoif=probes_autoif, probes_ours=probes_ours,
        dpo_probe=dp, dpo_probe_autoif=dpo_probe_autoif,
        dpo_probe_autoif_pairs=autoif_pairs(autoif_wash([dp], [dpo_probe_autoif]), random.Random(AUTOIF_SEED))[0],
        dpo_probe_ours=dpo_probe_ours, dpo_probe_ours_pairs=our_pairs(dpo_probe_ours, cfgs["code"]),
    )


def score_probe_rows() -> list[dict]:
    """Each judge-output probe: AutoIF's score and decision next to our parse_score and both thresholds."""
    from autoif.tasks.quality_filter import parse_score

    from autoif.config import load_config

    cfgs = {p: load_config(preset=p) for p in PRESETS}
    rows = []
    for name, text in SCORE_PROBES:
        score, reason, _ = parse_score(text)
        row = {"name": name, "text": text, "autoif_score": autoif_score([text]), "autoif_kept": autoif_score_kept([text]),
               "ours_score": score, "ours_reason": reason}
        for p, c in cfgs.items():
            row[f"ours_kept_{p}"] = reason is None and c.quality_filter.score.holds(score)
        rows.append(row)
    return rows


def _skips(calls: list[list[AutoIFCall]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for cs in calls:
        for c in cs:
            if c.value is None:
                key = c.why.split(":")[0]
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


def _cell(text: str, n: int = 40) -> str:
    return text[:n].replace("\n", " ").replace("|", "/")


def tables(r: Replay) -> str:
    code_kept, paper_kept = kept_per_pair(r.rft_ours["code"]), kept_per_pair(r.rft_ours["paper"])
    rates = per_pair(r.rft_ours["code"], "pass_rate")
    out = ["## 1. Verification (`query_rft.jsonl`, 16 responses per row)", "",
           "| # | instruction | funcs | AutoIF acc per response | AutoIF kept (acc > 0) | ours pass rate per response "
           "| ours kept, code (> 0) | ours kept, paper (> 0.5) |", "|---|---|---|---|---|---|---|---|"]
    for i, (row, a) in enumerate(zip(r.rft, r.rft_autoif)):
        out.append(f"| {i} | {_cell(row['instruction'])} | {len(row['eval_func'])} | {_rates(a.acc)} | {r.rft_autoif_kept[i]} "
                   f"| {_rates(rates[i])} | {code_kept[i]} | {paper_kept[i]} |")
    out += ["", f"Calls AutoIF skips: {_skips([c for a in r.rft_autoif for c in a.calls])}; "
            f"our outcomes: {_outcomes(r.rft_ours['code'])}", ""]

    out += ["## 2. Score filter (`query_rft_score.jsonl`)", "",
            "| # | judge's last line | AutoIF score -> kept (> 8) | in query_score_filter.jsonl | ours score "
            "| ours kept, code (> 8) | ours kept, paper (>= 8) |", "|---|---|---|---|---|---|---|"]
    for i, row in enumerate(r.score_rows):
        c, p = r.score_ours["code"].iloc[i], r.score_ours["paper"].iloc[i]
        out.append(f"| {i} | `{row['gen'][0].strip().splitlines()[-1]}` | {autoif_score(row['gen']):g} -> "
                   f"{autoif_score_kept(row['gen'])} | {row in r.score_filter_file} | {c['score']:g} | {pd.isna(c['reason'])} "
                   f"| {pd.isna(p['reason'])} |")
    out.append("")

    out += ["## 3a. DPO from functions (`dpo_query_w_funcs.jsonl`: 8 responses, 1 function)", "",
            "| # | query | AutoIF wash acc | AutoIF pos / neg -> branch -> pairs | ours pass rate | ours pairs, code | ours pairs, paper |",
            "|---|---|---|---|---|---|---|"]
    v = r.dpo_funcs_ours["code"]
    oc, op = pairs_per_prompt(r.dpo_funcs_ours_pairs["code"]), pairs_per_prompt(r.dpo_funcs_ours_pairs["paper"])
    rates = per_pair(v, "pass_rate")
    for i, (row, a, ap) in enumerate(zip(r.dpo_funcs, r.dpo_funcs_autoif, r.dpo_funcs_autoif_pairs)):
        out.append(f"| {i} | {_cell(split_prompt(row['prompt'])[1])} | {_rates(a.acc)} | {ap.positive} / {ap.negative} -> "
                   f"{ap.branch} -> {len(ap.pairs)} | {_rates(rates[i])} | {oc[i]} | {op[i]} |")
    out += ["", f"Calls AutoIF skips: {_skips([c for a in r.dpo_funcs_autoif for c in a.calls])}; our outcomes: {_outcomes(v)}", ""]

    out += ["## 3b. DPO from AutoIF's pass rates (`dpo_query_eval_score_results.jsonl`)", "",
            f"| # | prompt | pass rates | AutoIF pos / neg -> branch -> pairs (seed {AUTOIF_SEED}) | ours pairs, code | ours pairs, paper |",
            "|---|---|---|---|---|---|"]
    oc, op = pairs_per_prompt(r.dpo_rates_ours_pairs["code"]), pairs_per_prompt(r.dpo_rates_ours_pairs["paper"])
    for i, (row, ap) in enumerate(zip(r.dpo_rates, r.dpo_rates_autoif_pairs)):
        out.append(f"| {i} | {_cell(row['query'])} | {_rates(a for _, a in row['response'])} | {ap.positive} / {ap.negative} "
                   f"-> {ap.branch} -> {len(ap.pairs)} | {oc[i]} | {op[i]} |")
    out.append("")

    out += ["## 4a. Probes (ours): verification", "",
            "| probe | response | AutoIF values -> acc | ours outcomes -> pass rate | ours kept, code / paper | why |",
            "|---|---|---|---|---|---|"]
    for p, a, (_, c), (_, q) in zip(r.probes, r.probes_autoif, r.probes_ours["code"].iterrows(), r.probes_ours["paper"].iterrows()):
        values = ", ".join(str(x.value) if x.value is not None else f"skip ({_cell(x.why, 30)})" for x in a.calls[0])
        outcomes = ", ".join(f["outcome"] for f in json.loads(c["func_results"]))
        out.append(f"| {p['name']} | `{p['response']}` | {values} -> {a.acc[0]:g} | {outcomes} -> {c['pass_rate']:g} "
                   f"| {pd.isna(c['reason'])} / {pd.isna(q['reason'])} | {p['why']} |")
    ap, dpo = r.dpo_probe_autoif_pairs, r.dpo_probe_ours_pairs
    out += ["", "## 4b. Probe (ours): DPO pairs, the prime-number function of `dpo_query_w_funcs.jsonl`", "",
            "| responses | AutoIF wash acc -> pos / neg -> pairs | ours pass rate -> pairs (chosen / rejected) |",
            "|---|---|---|",
            f"| {' ; '.join(f'`{t}`' for t in r.dpo_probe['gpt-answer'])} | {_rates(r.dpo_probe_autoif.acc)} -> {ap.positive} / "
            f"{ap.negative} -> {len(ap.pairs)} | {_rates(r.dpo_probe_ours['pass_rate'])} -> "
            + "; ".join(f"`{c}` / `{j}`" for c, j in zip(dpo["chosen"], dpo["rejected"])) + " |"]
    out += ["", "## 4c. Probes (ours): judge outputs", "",
            "| probe | judge output | AutoIF score -> kept (> 8) | ours score (reason) | ours kept, code / paper |",
            "|---|---|---|---|---|"]
    for s in score_probe_rows():
        out.append(f"| {s['name']} | `{_cell(s['text'], 70)}` | {s['autoif_score']:g} -> {s['autoif_kept']} | "
                   f"{s['ours_score']} ({s['ours_reason'] or 'ok'}) | {s['ours_kept_code']} / {s['ours_kept_paper']} |")
    return "\n".join(out)


def metrics(r: Replay) -> dict[str, float]:
    out: dict[str, float] = {
        "verification.responses": float(sum(len(x["gpt-answer"]) for x in r.rft)),
        "verification.kept.autoif": float(sum(r.rft_autoif_kept)),
        "verification.kept.autoif_dedup": float(len(r.rft_autoif_samples)),
        "verification.kept.ours": float(sum(kept_per_pair(r.rft_ours["code"]))),
        "verification.kept.ours_paper": float(sum(kept_per_pair(r.rft_ours["paper"]))),
        "verification.calls.autoif": float(sum(len(cs) for a in r.rft_autoif for cs in a.calls)),
        "verification.calls_skipped.autoif": float(sum(c.value is None for a in r.rft_autoif for cs in a.calls for c in cs)),
        "verification.calls.ours": float(r.rft_ours["code"]["n_funcs"].sum()),
        "verification.calls_error.ours": float(r.rft_ours["code"]["n_errors"].sum()),
        "verification.calls_timeout.ours": float(r.rft_ours["code"]["n_timeouts"].sum()),
        "verification.duplicate_responses": float(sum(len(x["gpt-answer"]) - len(set(x["gpt-answer"])) for x in r.rft)),
        "score_filter.rows": float(len(r.score_rows)),
        "score_filter.kept.autoif": float(sum(autoif_score_kept(x["gen"]) for x in r.score_rows)),
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
            s = "" if preset == "code" else "_paper"
            out[f"{name}.pairs.ours{s}"] = float(dpo["reason"].isna().sum())
            out[f"{name}.distinct_pairs.ours{s}"] = float(distinct_pairs(dpo))
            out[f"{name}.prompts_with_pairs.ours{s}"] = float(dpo[dpo["reason"].isna()]["prompt"].nunique())
            for reason in ("no_chosen", "no_rejected"):
                out[f"{name}.prompts_{reason}.ours{s}"] = float((dpo["reason"] == reason).sum())
    out["dpo.pairs.autoif_min_over_seeds"] = float(min(r.dpo_rates_autoif_counts))
    out["dpo.pairs.autoif_max_over_seeds"] = float(max(r.dpo_rates_autoif_counts))
    for p, a, (_, c) in zip(r.probes, r.probes_autoif, r.probes_ours["code"].iterrows()):
        out[f"probe.{p['name']}.acc.autoif"] = a.acc[0]
        out[f"probe.{p['name']}.pass_rate.ours"] = float(c["pass_rate"])
    out["probe.dpo.pairs.autoif"] = float(len(r.dpo_probe_autoif_pairs.pairs))
    out["probe.dpo.pairs.ours"] = float(r.dpo_probe_ours_pairs["reason"].isna().sum())
    for s in score_probe_rows():
        out[f"probe.score.{s['name']}.kept.autoif"] = float(s["autoif_kept"])
        out[f"probe.score.{s['name']}.kept.ours"] = float(s["ours_kept_code"])
    return out


def main() -> None:
    r = replay(Path(sys.argv[1]) if len(sys.argv) > 1 else SAMPLE_DIR)
    print(tables(r))
    print()
    for k, v in metrics(r).items():
        print(f"{k} = {v:g}")


if __name__ == "__main__":
    main()
