"""Step 8: the training data. SFT rows (query + instruction -> a verified, scored response); query-level DPO
pairs (chosen pass rate >= 0.5, rejected == 0, at most 2 x 2 per prompt, and a prompt needs both);
instruction-level DPO pairs (prompt = the instruction; chosen a passing, rejected a failing test-case input
of the same instruction). Every row carries its pass rates, the functions' ids and its source rows."""
from __future__ import annotations

import hashlib
import itertools
import json

import pandas as pd

from autoif.config import InstructionPairsConfig, PairsConfig

SFT_COLUMNS = ["sft_id", "prompt", "response", "instruction_id", "instruction", "query_id", "query", "pass_rate", "score",
               "func_ids", "verifier_source", "response_id", "reason"]
DPO_COLUMNS = ["dpo_id", "level", "prompt", "chosen", "rejected", "chosen_pass_rate", "rejected_pass_rate", "chosen_score",
               "func_ids", "verifier_source", "instruction_id", "query_id", "chosen_source", "rejected_source", "reason"]


def training_prompt(query: str, instruction: str) -> str:
    """What the policy is trained on: the user's query followed by the instruction, as IFEval asks."""
    return f"{query}\n{instruction}"


def _id(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def sft_rows(clean: pd.DataFrame) -> pd.DataFrame:
    """One SFT row per response that passed verification, the score filter and the contamination check; a
    response text sampled twice for the same (instruction, query) is kept once (``duplicate_response``)."""
    seen: set[tuple[str, str, str]] = set()
    rows = []
    for r in clean.sort_values(["pair_id", "response_index"]).itertuples():
        key = (r.instruction_id, r.query_id, r.response)
        rows.append({"sft_id": _id(r.response_id), "prompt": training_prompt(r.query, r.instruction), "response": r.response,
                     "instruction_id": r.instruction_id, "instruction": r.instruction, "query_id": r.query_id,
                     "query": r.query, "pass_rate": float(r.pass_rate), "score": float(r.score), "func_ids": r.func_ids,
                     "verifier_source": r.verifier_source, "response_id": r.response_id,
                     "reason": "duplicate_response" if key in seen else None})
        seen.add(key)
    return pd.DataFrame(rows, columns=SFT_COLUMNS)


def query_pairs(verified: pd.DataFrame, clean: pd.DataFrame, cfg: PairsConfig) -> pd.DataFrame:
    """Per (instruction, query) pair: chosen = clean responses (verified, not contaminated, scored) with
    pass rate meeting ``chosen_pass_rate``, best first; rejected = responses with pass rate meeting
    ``rejected_pass_rate`` among all verified ones (verification's dropped rows are the failures), never a
    contaminated one; up to ``max_chosen x max_rejected`` pairs. A prompt without both sides is one dropped row."""
    chosen_all = clean[clean["pass_rate"].map(lambda x: cfg.chosen_pass_rate.holds(float(x))).astype(bool)]
    failing = verified["pass_rate"].map(lambda x: cfg.rejected_pass_rate.holds(float(x))).astype(bool)
    usable = verified["response"].fillna("").str.len().gt(0) & verified["reason"].ne("contaminated")
    rejected_all = verified[usable & failing]
    rows = []
    for pair_id, group in verified.groupby("pair_id", sort=True):
        first = group.iloc[0]
        # best chosen first; one response per distinct text on each side (a sampled repeat is not a new pair)
        chosen = chosen_all[chosen_all["pair_id"] == pair_id].sort_values(
            ["pass_rate", "score", "response_index"], ascending=[False, False, True]).drop_duplicates("response")
        chosen = chosen.head(cfg.max_chosen_per_prompt)
        rejected = rejected_all[rejected_all["pair_id"] == pair_id].sort_values("response_index").drop_duplicates("response")
        rejected = rejected.head(cfg.max_rejected_per_prompt)
        prompt = training_prompt(first["query"], first["instruction"])
        base = {"level": "query", "prompt": prompt, "func_ids": first["func_ids"], "verifier_source": first["verifier_source"],
                "instruction_id": first["instruction_id"], "query_id": first["query_id"]}
        if not len(chosen) or not len(rejected):
            rows.append({**base, "dpo_id": _id(pair_id, "none"), "chosen": None, "rejected": None, "chosen_pass_rate": None,
                         "rejected_pass_rate": None, "chosen_score": None, "chosen_source": None, "rejected_source": None,
                         "reason": "no_chosen" if not len(chosen) else "no_rejected"})
            continue
        for c, r in itertools.product(chosen.itertuples(), rejected.itertuples()):
            rows.append({**base, "dpo_id": _id(c.response_id, r.response_id), "chosen": c.response, "rejected": r.response,
                         "chosen_pass_rate": float(c.pass_rate), "rejected_pass_rate": float(r.pass_rate),
                         "chosen_score": float(c.score), "chosen_source": c.response_id, "rejected_source": r.response_id,
                         "reason": None})
    return pd.DataFrame(rows, columns=DPO_COLUMNS)


def instruction_pairs(instructions: pd.DataFrame, cfg: InstructionPairsConfig) -> pd.DataFrame:
    """Per instruction: its passing test-case inputs against its failing ones (cases cross-validation kept, or
    the reference cases of a seed)."""
    rows = []
    for r in instructions.itertuples():
        cases = json.loads(r.cases) if isinstance(r.cases, str) else []
        good = [c["input"] for c in cases if c["output"] is True][: cfg.max_chosen_per_instruction]
        bad = [c["input"] for c in cases if c["output"] is False][: cfg.max_rejected_per_instruction]
        base = {"level": "instruction", "prompt": r.instruction, "func_ids": r.func_ids, "verifier_source": r.verifier_source,
                "instruction_id": r.instruction_id, "query_id": None, "chosen_score": None}
        if not good or not bad:
            rows.append({**base, "dpo_id": _id(r.instruction_id, "none"), "chosen": None, "rejected": None,
                         "chosen_pass_rate": None, "rejected_pass_rate": None, "chosen_source": None, "rejected_source": None,
                         "reason": "no_passing_case" if not good else "no_failing_case"})
            continue
        for (i, c), (j, b) in itertools.product(enumerate(good), enumerate(bad)):
            rows.append({**base, "dpo_id": _id(r.instruction_id, c, b), "chosen": c, "rejected": b,
                         "chosen_pass_rate": 1.0, "rejected_pass_rate": 0.0,
                         "chosen_source": f"{r.instruction_id}:case:{i}", "rejected_source": f"{r.instruction_id}:case:{j}",
                         "reason": None})
    return pd.DataFrame(rows, columns=DPO_COLUMNS)
