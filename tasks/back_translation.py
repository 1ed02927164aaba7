"""Step 4: back-translation. The first ``max_funcs`` surviving functions of each instruction go back to the
LLM, which writes the instruction each one checks (a JSON list); the consistency filter compares them."""
from __future__ import annotations

import json
from typing import Iterable, Iterator

import pandas as pd
from autoif.tasks.batching import empty_frame, group_batches
from autoif.tasks.json_repair import FENCE, loads_repaired

from autoif.config import BackTranslationConfig
from autoif.llm import LLM, generate_each

BACK_TRANSLATION_PROMPT = """Below are Python functions that each check whether a response follows some instruction. For each function, write the instruction it checks, as one plain English sentence addressed to the writer of the response. Describe exactly what the code checks, nothing more.
Example: for "def evaluate(response):\\n    return response == response.lower()" the instruction is "Write your whole answer in lowercase letters."
Reply with one JSON object: {{"instructions": [one string per function, in order]}}

{funcs}"""

BACK_TRANSLATION_JSON_SCHEMA: dict = {
    "type": "object",
    "properties": {"instructions": {"type": "array", "items": {"type": "string"}}},
    "required": ["instructions"],
    "additionalProperties": False,
}


def back_translation_prompt(funcs: list[str]) -> str:
    return BACK_TRANSLATION_PROMPT.format(funcs="\n\n".join(f"Function {i + 1}:\n```python\n{f}\n```" for i, f in enumerate(funcs)))


def parse_back_translation(text: str, n_funcs: int) -> tuple[list[str] | None, str | None]:
    """A list of instruction strings (``{"instructions": [...]}`` or a bare list), at most one per function."""
    if not isinstance(text, str):
        return None, "back_translation_unparseable"
    stripped = text.strip()
    blobs = [b for _, b in FENCE.findall(stripped)] + [stripped]
    start, end = stripped.find("["), stripped.rfind("]")
    if start != -1 and end > start:
        blobs.append(stripped[start : end + 1])
    for blob in blobs:
        try:
            obj, _ = loads_repaired(blob.strip())
        except ValueError:
            continue
        items = obj.get("instructions") if isinstance(obj, dict) else obj
        if isinstance(items, list) and items and all(isinstance(s, str) and s.strip() for s in items):
            return [s.strip() for s in items[:n_funcs]], None
    return None, "back_translation_unparseable"


BT_COLUMNS = ["instruction_id", "instruction", "family", "funcs", "func_accuracies", "cases", "back_translations", "reason"]


def bt_batches(validated: Iterable[pd.DataFrame], cfg: BackTranslationConfig) -> Iterator[pd.DataFrame]:
    return group_batches(validated, "instruction_id", cfg.batch_size)


def no_back_translations() -> pd.DataFrame:
    return empty_frame(BT_COLUMNS)


def back_translate(batch: pd.DataFrame, llm: LLM, cfg: BackTranslationConfig, seed: int, batch_index: int) -> pd.DataFrame:
    funcs = [json.loads(f)[: cfg.max_funcs] for f in batch["funcs"]]
    gen = generate_each(llm, [back_translation_prompt(f) for f in funcs], n=1, temperature=cfg.temperature,
                        max_tokens=cfg.max_tokens, seed=seed + batch_index,
                        json_schema=BACK_TRANSLATION_JSON_SCHEMA if cfg.use_json_schema else None)
    rows = []
    for r, fs, out, error in zip(batch.itertuples(), funcs, gen.texts, gen.errors):
        if out is None:
            texts, reason = None, error
        else:
            texts, reason = parse_back_translation(out[0] if out else None, len(fs))
        rows.append({"instruction_id": r.instruction_id, "instruction": r.instruction, "family": r.family,
                     "funcs": r.funcs, "func_accuracies": r.func_accuracies, "cases": r.cases,
                     "back_translations": json.dumps(texts) if texts is not None else None, "reason": reason})
    return pd.DataFrame(rows, columns=BT_COLUMNS)
