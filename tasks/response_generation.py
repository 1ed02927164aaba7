"""Step 5, responses: K responses per (instruction, query) pair from the supervision engine, in batches."""
from __future__ import annotations

from typing import Iterable, Iterator

import pandas as pd
from autoif.tasks.batching import empty_frame, row_batches
from autoif.tasks.query_augmentation import PAIR_COLUMNS

from autoif.config import ResponseGenerationConfig
from autoif.llm import LLM, generate_each

RESPONSE_COLUMNS = ["response_id", "response_index", *[c for c in PAIR_COLUMNS if c != "reason"], "response", "reason"]


def response_batches(pairs: Iterable[pd.DataFrame], cfg: ResponseGenerationConfig) -> Iterator[pd.DataFrame]:
    return row_batches(pairs, cfg.batch_size)


def no_responses() -> pd.DataFrame:
    return empty_frame(RESPONSE_COLUMNS, ints=("response_index",))


def generate_responses(batch: pd.DataFrame, llm: LLM, cfg: ResponseGenerationConfig, seed: int,
                       batch_index: int) -> pd.DataFrame:
    """One row per response; a prompt the engine refused is one row with the engine's reason; an empty
    response is dropped as ``empty_response``."""
    gen = generate_each(llm, batch["prompt"].tolist(), n=cfg.n_responses, temperature=cfg.temperature,
                        max_tokens=cfg.max_tokens, seed=seed + batch_index)
    rows = []
    for pair, texts, error in zip(batch.to_dict("records"), gen.texts, gen.errors):
        base = {k: pair[k] for k in PAIR_COLUMNS if k != "reason"}
        if texts is None:
            rows.append({**base, "response_id": f"{pair['pair_id']}-0", "response_index": 0, "response": None, "reason": error})
            continue
        for k, text in enumerate(texts):
            text = text.strip() if isinstance(text, str) else ""
            rows.append({**base, "response_id": f"{pair['pair_id']}-{k}", "response_index": k, "response": text,
                         "reason": None if text else "empty_response"})
    return pd.DataFrame(rows, columns=RESPONSE_COLUMNS)
