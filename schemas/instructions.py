from __future__ import annotations

import pandera.pandas as pa
from autoif.schemas.base import StepFrame
from pandera.typing import Series


class Seeds(StepFrame):
    instruction_id: Series[str] = pa.Field(unique=True)
    instruction: Series[str] = pa.Field(str_length={"min_value": 1})
    family: Series[str]
    reference_func: Series[str] = pa.Field(nullable=True)  # the seed's reference verification function
    reference_cases: Series[str] = pa.Field(nullable=True)  # JSON [{"input", "output"}]


class Instructions(StepFrame):
    """Seeds plus self-instructed candidates; dropped ones keep their reason (empty, too_long, duplicate, ...)."""

    instruction_id: Series[str] = pa.Field(unique=True)
    instruction: Series[str]
    family: Series[str]  # seed family, or "augmented"
    source: Series[str] = pa.Field(isin=["seed", "self_instruct"])
