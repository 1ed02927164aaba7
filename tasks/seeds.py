"""The seed instructions: 36+ atomic constraints that a Python function can check (the shipped set or a
user's file). The step reads the file; a malformed row names file, line and field."""
from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import pandas as pd
from autoif.tasks.ids import instruction_id

from autoif.config import SelfInstructConfig
from autoif.jsonl import iter_jsonl


class SeedFileError(ValueError):
    """A seed file row is malformed; names the file, line and field."""


def seeds_path(cfg: SelfInstructConfig) -> Path:
    if cfg.seeds_path:
        return Path(cfg.seeds_path)
    return Path(str(resources.files("autoif") / "data" / "seeds.jsonl"))


def seeds_digest(cfg: SelfInstructConfig) -> str:
    """The seed file's content: what the seeds step is keyed by."""
    return hashlib.sha256(seeds_path(cfg).read_bytes()).hexdigest()


def read_seeds(path: Path) -> pd.DataFrame:
    """JSONL ``{"instruction", "family"?, "func"?, "cases"?}`` (``func``/``cases``: the seed's reference
    verification function and test cases) or plain text, one instruction per line."""
    rows = []
    if path.suffix == ".jsonl":
        for lineno, rec in iter_jsonl(path, SeedFileError):
            text, family = rec.get("instruction"), rec.get("family", "seed")
            if not isinstance(text, str) or not text.strip():
                raise SeedFileError(f"{path}:{lineno}: field 'instruction' must be a non-empty string")
            if not isinstance(family, str):
                raise SeedFileError(f"{path}:{lineno}: field 'family' must be a string")
            func, cases = rec.get("func"), rec.get("cases")
            if func is not None and not isinstance(func, str):
                raise SeedFileError(f"{path}:{lineno}: field 'func' must be the source of evaluate(response) -> bool")
            if cases is not None and not (isinstance(cases, list) and all(
                    isinstance(c, dict) and isinstance(c.get("input"), str) and isinstance(c.get("output"), bool) for c in cases)):
                raise SeedFileError(f"{path}:{lineno}: field 'cases' must be a list of {{\"input\": str, \"output\": bool}}")
            rows.append({"instruction": text.strip(), "family": family, "reference_func": func,
                         "reference_cases": json.dumps(cases) if cases is not None else None})
    else:
        rows = [{"instruction": line.strip().removeprefix("- ").strip(), "family": "seed"}
                for line in path.read_text().splitlines() if line.strip()]
    frame = pd.DataFrame(rows, columns=["instruction", "family", "reference_func", "reference_cases"])
    frame["instruction_id"] = frame["instruction"].map(instruction_id)
    frame["reason"] = None
    frame.loc[frame["instruction_id"].duplicated(), "reason"] = "duplicate_seed"
    frame = frame[frame["reason"].isna()].reset_index(drop=True)  # a repeated seed is the same seed
    return frame


def load_seeds(cfg: SelfInstructConfig) -> pd.DataFrame:
    return read_seeds(seeds_path(cfg))
