"""Step 5, query augmentation: each instruction is paired with random real user queries (seeded, so a run
is reproducible); the pair's prompt asks to answer the query strictly following the instruction."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from autoif.config import QueryAugmentationConfig

# AutoIF's prompt (sample data query_rft.jsonl)
RESPONSE_PROMPT = "Please answer the query strictly following the instruction.\n[instruction] {instruction}\n[Query] {query}"

PAIR_COLUMNS = ["pair_id", "instruction_id", "instruction", "family", "funcs", "func_ids", "verifier_source", "query_id",
                "query", "prompt", "reason"]


def response_prompt(instruction: str, query: str) -> str:
    return RESPONSE_PROMPT.format(instruction=instruction, query=query)


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def pair_queries(instructions: pd.DataFrame, queries: pd.DataFrame, cfg: QueryAugmentationConfig, seed: int) -> pd.DataFrame:
    """``queries_per_instruction`` queries per instruction, drawn without replacement; the draw of one
    instruction depends only on the run seed, its id and the query set (not on the other instructions)."""
    pool = queries.sort_values("query_id").reset_index(drop=True)
    todo = instructions if cfg.max_instructions is None else instructions.head(cfg.max_instructions)
    rows = []
    for r in todo.itertuples():
        k = min(cfg.queries_per_instruction, len(pool))
        rng = np.random.default_rng([seed, _stable_int(r.instruction_id)])
        for j in sorted(rng.choice(len(pool), size=k, replace=False).tolist()) if k else []:
            q = pool.iloc[j]
            rows.append({"pair_id": hashlib.sha256(f"{r.instruction_id}|{q.query_id}".encode()).hexdigest()[:16],
                         "instruction_id": r.instruction_id, "instruction": r.instruction, "family": r.family,
                         "funcs": r.funcs, "func_ids": r.func_ids, "verifier_source": r.verifier_source,
                         "query_id": q.query_id, "query": q.query, "prompt": response_prompt(r.instruction, q.query),
                         "reason": None})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)
