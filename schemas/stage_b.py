"""Contracts of AutoIF steps 5-8: stage B's instructions, queries, pairs, responses, verification, scores,
decontaminated responses, SFT rows and DPO pairs. List-valued columns are JSON strings."""
from __future__ import annotations

import pandera.pandas as pa
from autoif.schemas.base import StepFrame
from pandera.typing import Series


class StageBInstructions(StepFrame):
    """Instructions with the functions stage B verifies them by: stage A's (``synthesized``) or a seed's
    shipped ``reference``."""

    instruction_id: Series[str] = pa.Field(unique=True)
    instruction: Series[str]
    family: Series[str]
    funcs: Series[str]  # JSON list of function sources
    func_ids: Series[str]  # JSON list, one id per function
    cases: Series[str] = pa.Field(nullable=True)  # JSON [{"input", "output"}]
    verifier_source: Series[str] = pa.Field(isin=["synthesized", "reference"])


class Queries(StepFrame):
    """User queries; ``reason``: too_short, too_long, duplicate."""

    query_id: Series[str] = pa.Field(unique=True)
    query: Series[str]
    category: Series[str]
    source: Series[str]


class _Pair(StepFrame):
    instruction_id: Series[str]
    instruction: Series[str]
    family: Series[str]
    funcs: Series[str]
    func_ids: Series[str]
    verifier_source: Series[str] = pa.Field(isin=["synthesized", "reference"])
    query_id: Series[str]
    query: Series[str]
    prompt: Series[str]


class QueryPairs(_Pair):
    """One row per (instruction, query): the prompt asks to answer the query strictly following the instruction."""

    pair_id: Series[str] = pa.Field(unique=True)


class Responses(_Pair):
    """K rows per pair; ``reason``: empty_response, or the engine's (prompt_too_long, request_refused, ...)."""

    pair_id: Series[str]
    response_id: Series[str] = pa.Field(unique=True)
    response_index: Series[int] = pa.Field(ge=0)
    response: Series[str] = pa.Field(nullable=True)


class Verified(Responses):
    """Responses with every function's verdict; ``reason``: low_pass_rate, no_functions."""

    response: Series[str]
    pass_rate: Series[float] = pa.Field(ge=0, le=1)
    n_funcs: Series[int] = pa.Field(ge=0)
    n_passed: Series[int] = pa.Field(ge=0)
    n_errors: Series[int] = pa.Field(ge=0)
    n_timeouts: Series[int] = pa.Field(ge=0)
    func_results: Series[str]  # JSON [{"func_id", "outcome", "value"}]


class Decontaminated(Verified):
    """Every verified response; ``reason``: verification's, or contaminated (``contaminated_fields`` says which
    of query, response, instruction shares a 13-gram with a benchmark prompt)."""

    contaminated_fields: Series[str] = pa.Field(nullable=True)


class Scored(Decontaminated):
    """Clean verified responses with the LLM's relevance score; ``reason``: low_score, missing_score,
    score_out_of_range, or the engine's."""

    score: Series[float] = pa.Field(nullable=True)
    score_analysis: Series[str]


class SFTRows(StepFrame):
    sft_id: Series[str] = pa.Field(unique=True)
    prompt: Series[str]  # the user turn: query + instruction
    response: Series[str]
    instruction_id: Series[str]
    instruction: Series[str]
    query_id: Series[str]
    query: Series[str]
    pass_rate: Series[float] = pa.Field(ge=0, le=1)
    score: Series[float] = pa.Field(ge=0, le=10)
    func_ids: Series[str]
    verifier_source: Series[str] = pa.Field(isin=["synthesized", "reference"])
    response_id: Series[str]


class DPOPairs(StepFrame):
    """Query-level (``level = query``) or instruction-level pairs; a prompt that lacks one side is one dropped
    row (``reason``: no_chosen, no_rejected, no_passing_case, no_failing_case)."""

    dpo_id: Series[str] = pa.Field(unique=True)
    level: Series[str] = pa.Field(isin=["query", "instruction"])
    prompt: Series[str]
    chosen: Series[str] = pa.Field(nullable=True)
    rejected: Series[str] = pa.Field(nullable=True)
    chosen_pass_rate: Series[float] = pa.Field(nullable=True)
    rejected_pass_rate: Series[float] = pa.Field(nullable=True)
    chosen_score: Series[float] = pa.Field(nullable=True)
    func_ids: Series[str]
    verifier_source: Series[str]
    instruction_id: Series[str]
    query_id: Series[str] = pa.Field(nullable=True)
    chosen_source: Series[str] = pa.Field(nullable=True)
    rejected_source: Series[str] = pa.Field(nullable=True)

    @pa.dataframe_check(error="a kept pair needs chosen and rejected")
    def kept_pairs_complete(cls, df):
        kept = df["reason"].isna()
        return ~kept | (df["chosen"].notna() & df["rejected"].notna())
