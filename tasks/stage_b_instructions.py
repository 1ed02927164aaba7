"""Stage B's instructions: stage A's survivors with their cross-validated functions, plus, when
``seeds.use_reference_verifiers`` is on, the selected seed instructions with the reference verification
functions and test cases shipped with them (marked ``verifier_source = "reference"`` in every row after)."""
from __future__ import annotations

import hashlib
import json

import pandas as pd

from autoif.config import SeedsConfig

INSTRUCTION_COLUMNS = ["instruction_id", "instruction", "family", "funcs", "func_ids", "cases", "verifier_source", "reason"]


def func_id(src: str) -> str:
    return hashlib.sha256(src.encode()).hexdigest()[:12]


def stage_b_instructions(instructions: pd.DataFrame, selected: pd.DataFrame, seeds: pd.DataFrame,
                         cfg: SeedsConfig) -> pd.DataFrame:
    """``instructions``: stage A's product (kept); ``selected``: self-instruct's kept instructions (the seeds
    this run works on); ``seeds``: the seed file with its reference functions."""
    rows: dict[str, dict] = {}
    for r in instructions.itertuples():
        funcs = json.loads(r.funcs)
        rows[r.instruction_id] = {"instruction_id": r.instruction_id, "instruction": r.instruction, "family": r.family,
                                  "funcs": r.funcs, "func_ids": json.dumps([func_id(f) for f in funcs]),
                                  "cases": r.cases, "verifier_source": "synthesized", "reason": None}
    if cfg.use_reference_verifiers and "reference_func" in seeds:
        chosen = set(selected["instruction_id"])
        for r in seeds.itertuples():
            if r.instruction_id not in chosen or not isinstance(r.reference_func, str):
                continue
            rows[r.instruction_id] = {"instruction_id": r.instruction_id, "instruction": r.instruction, "family": r.family,
                                      "funcs": json.dumps([r.reference_func]), "func_ids": json.dumps([func_id(r.reference_func)]),
                                      "cases": r.reference_cases, "verifier_source": "reference", "reason": None}
    return pd.DataFrame(list(rows.values()), columns=INSTRUCTION_COLUMNS)
