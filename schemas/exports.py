"""Contracts of the exports: TRL conversational SFT and preference rows (conversations are lists of
``{"role", "content"}``, stored as Parquet list-of-struct columns), LLaMA-Factory's alpaca rows, the index of a
Hugging Face datasets directory. Exports hold kept rows only: no ``reason`` column, and no other column than
these (strict)."""
from __future__ import annotations

from typing import Any

import pandera.pandas as pa
from pandera.typing import Series


def is_conversation(value: Any, roles: tuple[str, ...]) -> bool:
    """A list of ``{"role", "content"}`` with exactly these roles in order and string contents (a conversation
    read back from Parquet is an array of dicts)."""
    try:
        turns = list(value)
    except TypeError:
        return False
    return len(turns) == len(roles) and all(
        isinstance(t, dict) and set(t) == {"role", "content"} and t["role"] == role and isinstance(t["content"], str)
        for t, role in zip(turns, roles))


class _Export(pa.DataFrameModel):
    class Config:
        strict = True
        coerce = True


class TRLSFT(_Export):
    """TRL conversational language modelling: ``messages`` = [user, assistant]."""

    messages: Series[object]
    sft_id: Series[str] = pa.Field(unique=True)
    instruction_id: Series[str]
    query_id: Series[str]
    pass_rate: Series[float] = pa.Field(ge=0, le=1)
    score: Series[float] = pa.Field(ge=0, le=10)
    func_ids: Series[str]  # JSON list, as in the SFT rows
    verifier_source: Series[str] = pa.Field(isin=["synthesized", "reference"])

    @pa.check("messages", element_wise=True, error="messages must be [user, assistant] {role, content} turns")
    def user_then_assistant(cls, v) -> bool:
        return is_conversation(v, ("user", "assistant"))


class TRLDPO(_Export):
    """TRL conversational preference: ``prompt`` = [user], ``chosen`` / ``rejected`` = [assistant]."""

    prompt: Series[object]
    chosen: Series[object]
    rejected: Series[object]
    dpo_id: Series[str] = pa.Field(unique=True)
    level: Series[str] = pa.Field(isin=["query", "instruction"])
    chosen_pass_rate: Series[float] = pa.Field(ge=0, le=1)
    rejected_pass_rate: Series[float] = pa.Field(ge=0, le=1)
    chosen_score: Series[float] = pa.Field(nullable=True)  # instruction-level pairs have no score
    func_ids: Series[str]
    verifier_source: Series[str] = pa.Field(isin=["synthesized", "reference"])
    instruction_id: Series[str]
    query_id: Series[str] = pa.Field(nullable=True)  # instruction-level pairs have no query
    chosen_source: Series[str]
    rejected_source: Series[str]

    @pa.check("prompt", element_wise=True, error="prompt must be one user {role, content} turn")
    def user_prompt(cls, v) -> bool:
        return is_conversation(v, ("user",))

    @pa.check("chosen", "rejected", element_wise=True, error="chosen / rejected must be one assistant turn")
    def assistant_answers(cls, v) -> bool:
        return is_conversation(v, ("assistant",))


class LlamaFactoryRows(_Export):
    """Every example of the LLaMA-Factory export as written to its JSON file (``file``): alpaca SFT (``format =
    sft``: ``output``, ``history`` as JSON) or alpaca preference (``format = dpo``: ``chosen``, ``rejected``)."""

    format: Series[str] = pa.Field(isin=["sft", "dpo"])
    example_id: Series[str]  # sft_id / dpo_id
    file: Series[str]
    instruction: Series[str]
    input: Series[str]
    output: Series[str] = pa.Field(nullable=True)
    chosen: Series[str] = pa.Field(nullable=True)
    rejected: Series[str] = pa.Field(nullable=True)
    history: Series[str] = pa.Field(nullable=True)
    level: Series[str] = pa.Field(nullable=True, isin=["query", "instruction"])

    @pa.dataframe_check(error="sft rows need output and history; dpo rows need chosen and rejected")
    def complete_examples(cls, df):
        sft = df["format"] == "sft"
        return (sft & df["output"].notna() & df["history"].notna()) | (~sft & df["chosen"].notna() & df["rejected"].notna())


class HFIndex(_Export):
    """The examples of a Hugging Face datasets directory: which config and file holds each."""

    config: Series[str] = pa.Field(isin=["sft", "dpo"])
    example_id: Series[str]
    file: Series[str]
