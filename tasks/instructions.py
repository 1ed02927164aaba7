"""Step 1: seed instructions and self-instruct."""
from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path

import pandas as pd

from autoif.config import RunConfig, SelfInstructConfig
from autoif.llm import LLM
from autoif.schemas.instructions import Instructions, Seeds
from autoif.steps import step

SELF_INSTRUCT_PROMPT = """You are an expert for writing instructions. Please provide 50 different instructions that meet the following requirements:
- Instructions are about the format but not style of a response
- Whether instructions are followed can be easily evaluated by a Python function
Here are some examples of instructions we need:
{seeds}
Do not generate instructions about writing style, using metaphor, or translation. Here are some examples of instructions we do not need:
- Incorporate a famous historical quote seamlessly into your answer
- Translate your answer into Pig Latin
- Use only words that are also a type of food
- Respond with a metaphor in every sentence
Please generate one instruction per line in your response and start each line with '- '.
"""


class SeedFileError(ValueError):
    """A seed file row is malformed; names the file, line and field."""


def seeds_path(cfg: SelfInstructConfig) -> Path:
    if cfg.seeds_path:
        return Path(cfg.seeds_path)
    return Path(str(resources.files("autoif") / "data" / "seeds.jsonl"))


def _file_digest(cfg: RunConfig) -> str:
    return hashlib.sha256(seeds_path(cfg.self_instruct).read_bytes()).hexdigest()


def instruction_id(text: str) -> str:
    return hashlib.sha256(normalise(text).encode()).hexdigest()[:16]


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def read_seeds(path: Path) -> pd.DataFrame:
    """JSONL ``{"instruction", "family"?}`` or plain text, one instruction per line."""
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SeedFileError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            text = rec.get("instruction") if isinstance(rec, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise SeedFileError(f"{path}:{lineno}: field 'instruction' must be a non-empty string")
            family = rec.get("family", "seed")
            if not isinstance(family, str):
                raise SeedFileError(f"{path}:{lineno}: field 'family' must be a string")
        else:
            text, family = line.strip().removeprefix("- "), "seed"
        rows.append({"instruction": text.strip(), "family": family})
    frame = pd.DataFrame(rows, columns=["instruction", "family"])
    frame["instruction_id"] = frame["instruction"].map(instruction_id)
    frame["reason"] = None
    frame.loc[frame["instruction_id"].duplicated(), "reason"] = "duplicate_seed"
    frame = frame[frame["reason"].isna()].reset_index(drop=True)  # a repeated seed is the same seed
    return frame


@step("seeds", schema=Seeds, key_extra=_file_digest)  # keyed by the seed file's content only
def load_seeds(cfg: RunConfig) -> pd.DataFrame:
    return read_seeds(seeds_path(cfg.self_instruct))


_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+(.*\S)\s*$")


def parse_instruction_lines(text: str) -> list[str]:
    """Lines that start with '- ' (also '* ', '1. ' which models use anyway); other lines are chatter."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            out.append(m.group(1).strip().strip('"').strip())
    return out


def junk_reason(text: str, cfg: SelfInstructConfig) -> str | None:
    if not text:
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) / len(letters) < 0.9:
        return "non_english"
    return None


@step("self_instruct", schema=Instructions, config="self_instruct", uses_llm=True)
def self_instruct(seeds: pd.DataFrame, llm: LLM, cfg: SelfInstructConfig, seed: int) -> pd.DataFrame:
    """K sampled calls of the all-seeds prompt; parse, filter, dedup against seeds and each other."""
    prompt = SELF_INSTRUCT_PROMPT.format(seeds="\n".join(f"- {s}" for s in seeds["instruction"]))
    rows = [
        {"instruction_id": r.instruction_id, "instruction": r.instruction, "family": r.family, "source": "seed", "reason": None}
        for r in seeds.itertuples()
    ]
    seen = set(seeds["instruction_id"])
    completions = llm.generate([prompt], n=cfg.n_calls, temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=seed)[0] if cfg.n_calls else []
    for k, completion in enumerate(completions):
        lines = parse_instruction_lines(completion)
        if not lines:
            rows.append({"instruction_id": f"call{k}-empty", "instruction": completion[:300], "family": "augmented",
                         "source": "self_instruct", "reason": "no_instruction_lines"})
        for j, text in enumerate(lines):
            iid = instruction_id(text)
            reason = junk_reason(text, cfg)
            if reason is None and iid in seen:
                reason = "duplicate"
            rows.append({"instruction_id": iid if reason is None else f"call{k}-{j}-{iid}", "instruction": text,
                         "family": "augmented", "source": "self_instruct", "reason": reason})
            if reason is None:
                seen.add(iid)
    return pd.DataFrame(rows, columns=["instruction_id", "instruction", "family", "source", "reason"])
