"""Step 7, quality filter: the LLM scores how well a verified response answers its query (0..10), with an
analysis and a last line "Score: N" (AutoIF's prompt), as constrained JSON where the engine supports it.
A missing or out-of-range score is a reason, never a crash; kept: the preset's threshold (code: > 8,
paper: >= 8)."""
from __future__ import annotations

import re
from typing import Iterable, Iterator

import pandas as pd
from autoif.tasks.batching import empty_frame, row_batches
from autoif.tasks.json_repair import json_object
from autoif.tasks.metrics import histogram, means
from autoif.tasks.contamination import DECONTAMINATED_COLUMNS

from autoif.config import QualityFilterConfig
from autoif.llm import LLM, generate_each

# AutoIF's prompt (sample data query_rft_score.jsonl)
SCORE_PROMPT = """You are an expert that is good at judging whether a response is following the instruction and query.
[Instruction] {instruction}
[Query] {query}
[Response] {response}
Please notice that the response may not be helpful as it needs to strictly follow the requirements in the Instruction.
You need to judge whether the response answers the query. Please first provide a detailed analysis and then give a score ranking from 0 to 10 at the last line.
Scoring 0 means the response is totally unrelated to the query, while scoring 10 means the response is helpful and highly related to the query.
Please only provide a score in the format `Score: {{score}}` without any other contents at the last line."""

SCORE_JSON_SCHEMA: dict = {  # the analysis first (the judge reasons, then scores), bounded so the score fits
    "type": "object",
    "properties": {"analysis": {"type": "string", "maxLength": 600}, "score": {"type": "integer", "enum": list(range(11))}},
    "required": ["analysis", "score"],
    "additionalProperties": False,
}

SCORED_COLUMNS = [*[c for c in DECONTAMINATED_COLUMNS if c != "reason"], "score", "score_analysis", "reason"]
_SCORE_LINE = re.compile(r"score\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def score_prompt(instruction: str, query: str, response: str) -> str:
    return SCORE_PROMPT.format(instruction=instruction, query=query, response=response)


def parse_score(text: str | None) -> tuple[float | None, str | None, str]:
    """(score, reason, analysis): the last line "Score: N" (AutoIF's format) when there is one, else the
    ``{"analysis", "score"}`` object of a constrained answer, else the last "Score: N" anywhere."""
    if not isinstance(text, str) or not text.strip():
        return None, "missing_score", ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    m = _SCORE_LINE.search(lines[-1]) if lines else None
    if m is not None:  # an explicit last line wins over JSON the analysis may quote
        return _ranged(float(m.group(1)), "\n".join(lines[:-1]))
    obj = json_object(text)
    if obj is not None and "score" in obj:  # the constrained answer {"analysis", "score"}
        value = obj["score"]
        analysis = obj.get("analysis") if isinstance(obj.get("analysis"), str) else ""
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return None, "missing_score", analysis
        try:
            return _ranged(float(value), analysis)
        except ValueError:
            return None, "missing_score", analysis
    found = _SCORE_LINE.findall(text)
    if not found:
        return None, "missing_score", text
    return _ranged(float(found[-1]), text)


def _ranged(score: float, analysis: str) -> tuple[float | None, str | None, str]:
    if not 0 <= score <= 10:
        return score, "score_out_of_range", analysis
    return score, None, analysis


def score_batches(clean: Iterable[pd.DataFrame], cfg: QualityFilterConfig) -> Iterator[pd.DataFrame]:
    return row_batches(clean, cfg.batch_size)


def no_scored() -> pd.DataFrame:
    return empty_frame(SCORED_COLUMNS, ints=("response_index", "n_funcs", "n_passed", "n_errors", "n_timeouts"))


def score_responses(batch: pd.DataFrame, llm: LLM, cfg: QualityFilterConfig, seed: int, batch_index: int) -> pd.DataFrame:
    prompts = [score_prompt(r.instruction, r.query, r.response) for r in batch.itertuples()]
    gen = generate_each(llm, prompts, n=1, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                        seed=seed + batch_index, json_schema=SCORE_JSON_SCHEMA if cfg.use_json_schema else None)
    rows = []
    for r, texts, error in zip(batch.to_dict("records"), gen.texts, gen.errors):
        if texts is None:
            score, reason, analysis = None, error, ""
        else:
            score, reason, analysis = parse_score(texts[0])
            if reason is None and not cfg.score.holds(score):
                reason = "low_score"
        rows.append({**{k: r[k] for k in DECONTAMINATED_COLUMNS if k != "reason"}, "score": score,
                     "score_analysis": analysis[:1000], "reason": reason})
    return pd.DataFrame(rows, columns=SCORED_COLUMNS)


def score_metrics(df: pd.DataFrame) -> dict[str, float]:
    scores = [float(s) / 10 for s in df["score"].dropna() if 0 <= s <= 10]
    return histogram(scores, "score_over_10")


def score_means(totals: dict[str, float]) -> dict[str, float]:
    return means(totals, ("score_over_10",))
