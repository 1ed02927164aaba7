"""Step 4 (second half): the consistency filter. Premise = the instruction, hypothesis = each back-translation;
the instruction is dropped on any contradiction. ``nli``: a local classifier (loaded once per process);
``llm_judge``: the engine labels the pair; ``off``: keep all."""
from __future__ import annotations

import json
import re
from typing import Iterable, Iterator

import pandas as pd
from autoif.tasks.batching import empty_frame, group_batches
from autoif.tasks.json_repair import json_object
from autoif.tasks.metrics import family_counts

from autoif.config import ConsistencyFilterConfig, NLIMode
from autoif.llm import LLM, generate_each

JUDGE_PROMPT = """Do these two instructions ask for compatible things? The first is the original instruction; the second was written from code that checks responses to it.
Original: {premise}
From code: {hypothesis}
Answer "contradiction" if a response cannot satisfy both, "entailment" if the second says the same as the first or less, "neutral" otherwise.
Reply with one JSON object: {{"label": "entailment" | "neutral" | "contradiction"}}"""

JUDGE_LABELS = ("entailment", "neutral", "contradiction")
JUDGE_JSON_SCHEMA: dict = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": list(JUDGE_LABELS)}},
    "required": ["label"],
    "additionalProperties": False,
}


def parse_judge_label(text: str) -> str | None:
    """The judge's label: from ``{"label": ...}``, else a lone label word in the reply; None if unclear."""
    if not isinstance(text, str):
        return None
    obj = json_object(text)
    if obj is not None and isinstance(obj.get("label"), str) and obj["label"].strip().lower() in JUDGE_LABELS:
        return obj["label"].strip().lower()
    found = {w for w in re.findall(r"[a-z]+", text.lower()) if w in JUDGE_LABELS}
    return found.pop() if len(found) == 1 else None


VERIFIABILITY_PROMPT = """Can the instruction below be checked by a Python function that sees only the text of a response? It cannot if checking it needs anything outside the text: a dictionary, a web page, facts about the world, the reader's intent, or a list the instruction leaves unspecified. Functions written to check it are shown; judge whether they really check the instruction.
Instruction: {instruction}
Functions:
{funcs}
Reply with one JSON object: {{"verifiable": true or false, "reason": "one sentence"}}"""

VERIFIABILITY_JSON_SCHEMA: dict = {
    "type": "object",
    "properties": {"verifiable": {"type": "boolean"}, "reason": {"type": "string"}},
    "required": ["verifiable", "reason"],
    "additionalProperties": False,
}

CONSISTENT_COLUMNS = ["instruction_id", "instruction", "family", "funcs", "func_accuracies", "cases", "back_translations",
                      "labels", "verifiability", "reason"]


def verifiability_prompt(instruction: str, funcs: list[str]) -> str:
    listing = "\n\n".join(f"```python\n{f}\n```" for f in funcs)
    return VERIFIABILITY_PROMPT.format(instruction=instruction, funcs=listing)


def parse_verifiability(text: str | None) -> tuple[bool | None, str]:
    """(verifiable, reason) from ``{"verifiable": bool, "reason": str}``; None when unclear."""
    if not isinstance(text, str):
        return None, ""
    obj = json_object(text)
    if obj is None or not isinstance(obj.get("verifiable"), bool):
        return None, text[:300]
    return obj["verifiable"], str(obj.get("reason", ""))[:300]


def consistency_metrics(df: pd.DataFrame) -> dict[str, float]:
    out = family_counts(df)
    for cell in df["labels"].dropna():
        for label in json.loads(cell):
            key = f"label.{label or 'unparseable'}"
            out[key] = out.get(key, 0.0) + 1.0
    return out


def consistency_batches(translated: Iterable[pd.DataFrame], cfg: ConsistencyFilterConfig) -> Iterator[pd.DataFrame]:
    return group_batches(translated, "instruction_id", cfg.batch_size)


def no_consistent() -> pd.DataFrame:
    return empty_frame(CONSISTENT_COLUMNS)


def consistency_filter(batch: pd.DataFrame, llm: LLM, cfg: ConsistencyFilterConfig, seed: int, batch_index: int,
                       nli=None) -> pd.DataFrame:
    """``nli`` is the classifier (``autoif.nli.NLIClassifier``) when ``cfg.mode`` is ``nli``."""
    pairs = [(r.instruction, h) for r in batch.itertuples() for h in json.loads(r.back_translations)]
    if cfg.mode is NLIMode.nli:
        if nli is None:
            raise ValueError("consistency_filter.mode=nli needs consistency_filter.nli_model (a local path or model id)")
        labels: list[str | None] = list(nli.labels(pairs, cfg.nli_batch_size))
    elif cfg.mode is NLIMode.llm_judge:
        prompts = [JUDGE_PROMPT.format(premise=p, hypothesis=h) for p, h in pairs]
        gen = generate_each(llm, prompts, n=1, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                            seed=seed + batch_index, json_schema=JUDGE_JSON_SCHEMA if cfg.use_json_schema else None)
        labels = [parse_judge_label(o[0]) if o else None for o in gen.texts]
    else:
        labels = [None] * len(pairs)
    rows, pos = [], 0
    for r in batch.itertuples():
        n = len(json.loads(r.back_translations))
        mine, pos = labels[pos : pos + n], pos + n
        if cfg.mode is NLIMode.off:
            reason = None
        elif cfg.contradiction_label.lower() in mine:
            reason = "contradiction"
        elif any(label is None for label in mine):
            reason = "judge_unparseable"
        elif cfg.require_entailment and any(label != "entailment" for label in mine):
            reason = "not_entailed"
        else:
            reason = None
        rows.append({"instruction_id": r.instruction_id, "instruction": r.instruction, "family": r.family,
                     "funcs": r.funcs, "func_accuracies": r.func_accuracies, "cases": r.cases,
                     "back_translations": r.back_translations,
                     "labels": json.dumps(mine) if cfg.mode is not NLIMode.off else None, "verifiability": None,
                     "reason": reason})
    if cfg.judge_verifiability:
        _judge_verifiability(rows, llm, cfg, seed + batch_index)
    return pd.DataFrame(rows, columns=CONSISTENT_COLUMNS)


def _judge_verifiability(rows: list[dict], llm: LLM, cfg: ConsistencyFilterConfig, seed: int) -> None:
    """Ask the LLM, for each instruction still kept, whether its functions can check it from the text alone."""
    todo = [r for r in rows if r["reason"] is None]
    if not todo:
        return
    gen = generate_each(llm, [verifiability_prompt(r["instruction"], json.loads(r["funcs"])) for r in todo], n=1,
                        temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=seed,
                        json_schema=VERIFIABILITY_JSON_SCHEMA if cfg.use_json_schema else None)
    for r, texts, error in zip(todo, gen.texts, gen.errors):
        verdict, why = parse_verifiability(texts[0] if texts else None)
        r["verifiability"] = json.dumps({"verifiable": verdict, "reason": why or error})
        if texts is None:
            r["reason"] = error
        elif verdict is None:
            r["reason"] = "judge_unparseable"
        elif not verdict:
            r["reason"] = "unverifiable"
