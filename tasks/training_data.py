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
    contaminated one; one response per distinct text on each side (a sampled repeat is not a new pair); up to
    ``max_chosen x max_rejected`` pairs. A prompt without both sides is one dropped row. Vectorised: one sort and
    one merge, not a scan per prompt (10k prompts: 44 s -> 1.2 s)."""
    chosen_all = clean[clean["pass_rate"].map(lambda x: cfg.chosen_pass_rate.holds(float(x))).astype(bool)]
    failing = verified["pass_rate"].map(lambda x: cfg.rejected_pass_rate.holds(float(x))).astype(bool)
    usable = verified["response"].fillna("").str.len().gt(0) & verified["reason"].ne("contaminated")
    rejected_all = verified[usable & failing]
    c = chosen_all.sort_values(["pair_id", "pass_rate", "score", "response_index"], ascending=[True, False, False, True],
                               kind="mergesort").drop_duplicates(["pair_id", "response"])
    c = c[c.groupby("pair_id").cumcount() < cfg.max_chosen_per_prompt]
    r = rejected_all.sort_values(["pair_id", "response_index"], kind="mergesort").drop_duplicates(["pair_id", "response"])
    r = r[r.groupby("pair_id").cumcount() < cfg.max_rejected_per_prompt]
    first = verified.drop_duplicates("pair_id").set_index("pair_id")
    m = c[["pair_id", "response", "pass_rate", "score", "response_id"]].merge(
        r[["pair_id", "response", "pass_rate", "response_id"]], on="pair_id", suffixes=("_c", "_r"))
    kept = pd.DataFrame({
        "pair_id": m["pair_id"], "dpo_id": [_id(a, b) for a, b in zip(m["response_id_c"], m["response_id_r"])],
        "chosen": m["response_c"], "rejected": m["response_r"], "chosen_pass_rate": m["pass_rate_c"].astype(float),
        "rejected_pass_rate": m["pass_rate_r"].astype(float), "chosen_score": m["score"].astype(float),
        "chosen_source": m["response_id_c"], "rejected_source": m["response_id_r"], "reason": None})
    paired, with_chosen = set(m["pair_id"]), set(c["pair_id"])
    missing = [p for p in first.index if p not in paired]
    dropped = pd.DataFrame({"pair_id": missing, "dpo_id": [_id(p, "none") for p in missing],
                            "reason": ["no_rejected" if p in with_chosen else "no_chosen" for p in missing]})
    out = pd.concat([kept, dropped], ignore_index=True).sort_values("pair_id", kind="mergesort")
    f = first.loc[out["pair_id"]]
    out["level"] = "query"
    out["prompt"] = [training_prompt(q, i) for q, i in zip(f["query"], f["instruction"])]
    for col in ("func_ids", "verifier_source", "instruction_id", "query_id"):
        out[col] = f[col].to_numpy()
    return out[DPO_COLUMNS].reset_index(drop=True)


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
