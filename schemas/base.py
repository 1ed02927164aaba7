from __future__ import annotations

import pandera.pandas as pa
from pandera.typing import Series


class StepFrame(pa.DataFrameModel):
    """Columns every step output has: why a row was dropped (null when kept)."""

    reason: Series[str] = pa.Field(nullable=True)

    class Config:
        strict = False  # steps may carry extra explanatory columns
        coerce = True
