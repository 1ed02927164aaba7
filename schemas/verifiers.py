"""Contracts of AutoIF steps 2-4: verifier candidates, cross-validated, back-translated, consistent instructions.

List-valued columns (functions, cases, reports) are JSON strings: one row per instruction stays one row, and
the Parquet files read anywhere without nested types.
"""
from __future__ import annotations

import pandera.pandas as pa
from autoif.schemas.base import StepFrame
from pandera.typing import Series


class VerifierCandidates(StepFrame):
    """One row per completion asked for an instruction. ``func`` is null when the completion was unusable
    (``reason``: no_json, invalid_json, json_not_object, missing_func, func_not_string, func_too_long,
    syntax_error, no_evaluate_function, empty_completion)."""

    instruction_id: Series[str]
    instruction: Series[str]
    family: Series[str]
    completion: Series[int] = pa.Field(ge=0)
    func: Series[str] = pa.Field(nullable=True)
    func_key: Series[str] = pa.Field(nullable=True)  # hash of the normalised source: duplicates share it
    cases: Series[str] = pa.Field(nullable=True)  # JSON [{"input": str, "output": bool}], labels normalised
    n_cases: Series[int] = pa.Field(ge=0)
    case_errors: Series[str]  # JSON list: why test cases of this completion were discarded
    repairs: Series[str]  # JSON list: what was repaired to parse it
    raw: Series[str]  # the completion (truncated), for debugging

    @pa.dataframe_check(error="a kept row needs func, func_key and cases")
    def kept_rows_complete(cls, df):
        kept = df["reason"].isna()
        return ~kept | (df["func"].notna() & df["func_key"].notna() & df["cases"].notna())


class CrossValidated(StepFrame):
    """One row per instruction that had at least one usable function. ``funcs``/``func_accuracies``/``cases``
    hold what survived; ``func_report``/``case_report`` say per function (accuracy, reason) and per case
    (agreement, reason) what happened. ``reason``: too_few_functions, too_few_cases, one_label_cases,
    no_surviving_function."""

    instruction_id: Series[str] = pa.Field(unique=True)
    instruction: Series[str]
    family: Series[str]
    n_completions: Series[int] = pa.Field(ge=0)
    n_funcs: Series[int] = pa.Field(ge=0)
    n_cases: Series[int] = pa.Field(ge=0)
    n_cases_kept: Series[int] = pa.Field(ge=0)
    funcs: Series[str]
    func_accuracies: Series[str]
    cases: Series[str]
    func_report: Series[str]
    case_report: Series[str]


class BackTranslated(StepFrame):
    """Cross-validated instructions with the instruction text the LLM read back from up to N functions.
    ``reason``: back_translation_unparseable."""

    instruction_id: Series[str] = pa.Field(unique=True)
    instruction: Series[str]
    family: Series[str]
    funcs: Series[str]
    func_accuracies: Series[str]
    cases: Series[str]
    back_translations: Series[str] = pa.Field(nullable=True)  # JSON list of str


class Consistent(BackTranslated):
    """Stage A's product: instructions whose back-translations do not contradict them, with their verified
    functions and test cases. ``labels``: JSON list, one NLI/judge label per back-translation.
    ``reason``: contradiction, judge_unparseable."""

    labels: Series[str] = pa.Field(nullable=True)
    verifiability: Series[str] = pa.Field(nullable=True)  # JSON {"verifiable", "reason"} when judged


class ReferenceAgreement(StepFrame):
    """Per function synthesized for a seed with a shipped reference: the share of probe responses and
    reference cases on which both functions give the same verdict."""

    instruction_id: Series[str]
    instruction: Series[str]
    family: Series[str]
    completion: Series[int] = pa.Field(ge=0)
    func_key: Series[str]
    agreement: Series[float] = pa.Field(ge=0, le=1)
    n_inputs: Series[int] = pa.Field(ge=0)
    reference_errors: Series[int] = pa.Field(ge=0)
