"""Contract of AutoIF steps 9-10: a trained policy is one row (its weights as a zip blob, its lineage, its training
summary). The base model is no row: where an init model is optional, an empty frame stands for the base."""
from __future__ import annotations

import pandas as pd
import pandera.pandas as pa
from autoif.schemas.base import StepFrame
from pandera.typing import Series

from autoif.policy import weights_digest

TRAIN_METHODS = ["sft", "dpo", "online_dpo", "grpo"]


class TrainedModels(StepFrame):
    """``weights``: :func:`autoif.policy.pack_weights` of the peft adapter dir (``is_adapter``) or of the full model
    dir with its tokenizer; ``weights_digest`` names it (:func:`autoif.policy.weights_digest`). ``parent``: the
    model_id training started from, or ``base``. ``log_history``: JSON of TRL's ``trainer.state.log_history``
    (non-finite numbers as null)."""

    model_id: Series[str]
    method: Series[str] = pa.Field(isin=TRAIN_METHODS)
    iteration: Series[int] = pa.Field(ge=0)  # 0 offline, 1.. online
    base_model: Series[str]
    base_identity: Series[str]
    parent: Series[str]
    is_adapter: Series[bool]
    train_rows: Series[int] = pa.Field(ge=0)
    steps: Series[int] = pa.Field(ge=0)
    train_loss: Series[float] = pa.Field(nullable=True)
    reward_margin: Series[float] = pa.Field(nullable=True)  # DPO's last logged rewards/margins
    seconds: Series[float] = pa.Field(ge=0)
    log_history: Series[str]
    weights: Series[object] = pa.Field(nullable=True)  # bytes; null only on a dropped row
    weights_digest: Series[str] = pa.Field(nullable=True)

    @pa.dataframe_check(error="a kept row needs non-empty bytes weights whose digest is weights_digest")
    def kept_weights_match_digest(cls, df):
        kept = df["reason"].isna()
        ok = pd.Series([isinstance(w, bytes) and len(w) > 0 and weights_digest(w) == d
                        for w, d in zip(df["weights"], df["weights_digest"])], index=df.index, dtype=bool)
        return ~kept | ok

    @pa.dataframe_check(error="model_id must be unique among kept rows")
    def one_kept_row_per_model(cls, df):
        kept = df["reason"].isna()
        return ~(kept & df["model_id"].where(kept).duplicated(keep=False))
