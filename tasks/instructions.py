"""Step 1: seed instructions and self-instruct."""
from __future__ import annotations

import hashlib
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from autoif.config import RunConfig, SelfInstructConfig
from autoif.jsonl import iter_jsonl
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
    if path.suffix == ".jsonl":
        for lineno, rec in iter_jsonl(path, SeedFileError):
            text, family = rec.get("instruction"), rec.get("family", "seed")
            if not isinstance(text, str) or not text.strip():
                raise SeedFileError(f"{path}:{lineno}: field 'instruction' must be a non-empty string")
            if not isinstance(family, str):
                raise SeedFileError(f"{path}:{lineno}: field 'family' must be a string")
            rows.append({"instruction": text.strip(), "family": family})
    else:
        rows = [{"instruction": line.strip().removeprefix("- ").strip(), "family": "seed"}
                for line in path.read_text().splitlines() if line.strip()]
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
_WRAP = re.compile(r"^(?:\*\*|__|[`\"'“”‘’])+|(?:\*\*|__|[`\"'“”‘’])+$")


def parse_instruction_lines(text: str) -> list[str]:
    """Lines that start with '- ' (also '* ', '1. ' which models use anyway); other lines are chatter.
    Each is normalised: whitespace collapsed, wrapping quotes, backticks and markdown bold removed."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            out.append(_WRAP.sub("", re.sub(r"\s+", " ", m.group(1))).strip())
    return out


def junk_reason(text: str, cfg: SelfInstructConfig) -> str | None:
    if not text:
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) / len(letters) < cfg.min_english_ratio:
        return "non_english"
    return None


_PRIME = (1 << 31) - 1  # hashes and MinHash permutations live below it, so a * x + b fits in uint64


def shingles(text: str, k: int) -> frozenset[str]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    if len(words) <= k:
        return frozenset([" ".join(words)])
    return frozenset(" ".join(words[i : i + k]) for i in range(len(words) - k + 1))


class NearDuplicateIndex:
    """Near-duplicate lookup by Jaccard similarity of word shingles: MinHash signatures bucketed by LSH
    bands find candidates cheaply; each candidate is then checked with the exact Jaccard similarity."""

    def __init__(self, threshold: float, shingle_words: int, perms: int, bands: int, seed: int = 0) -> None:
        if perms % bands:
            raise ValueError(f"minhash_perms={perms} must be a multiple of minhash_bands={bands}")
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, _PRIME, perms, dtype=np.uint64)[:, None]
        self.b = rng.integers(0, _PRIME, perms, dtype=np.uint64)[:, None]
        self.threshold, self.k, self.rows = threshold, shingle_words, perms // bands
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self.sets: list[frozenset[str]] = []
        self.ids: list[str] = []

    def _bands(self, sh: frozenset[str]) -> list[bytes]:
        x = np.fromiter((int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") % _PRIME for s in sh),
                        dtype=np.uint64, count=len(sh))
        sig = ((self.a * x[None, :] + self.b) % _PRIME).min(axis=1)
        return [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(len(self.buckets))]

    def match_or_add(self, key: str, text: str) -> str | None:
        """The key of an indexed near-duplicate of ``text``; None (and ``text`` is indexed) when there is none."""
        sh = shingles(text, self.k)
        bands = self._bands(sh)
        seen: set[int] = set()
        for table, band in zip(self.buckets, bands):
            for j in table.get(band, ()):
                if j not in seen:
                    seen.add(j)
                    other = self.sets[j]
                    if len(sh & other) / len(sh | other) >= self.threshold:
                        return self.ids[j]
        n = len(self.sets)
        self.sets.append(sh)
        self.ids.append(key)
        for table, band in zip(self.buckets, bands):
            table.setdefault(band, []).append(n)
        return None


def family_counts(df: pd.DataFrame) -> dict[str, float]:
    """Per seed family: rows in this output and rows kept (additive, so they sum over parts)."""
    out: dict[str, float] = {}
    for fam, g in df.groupby("family"):
        fam = re.sub(r"[^\w\-]", "_", str(fam))  # a metric-name-safe family name
        out[f"family.{fam}.rows"] = out.get(f"family.{fam}.rows", 0.0) + float(len(g))
        out[f"family.{fam}.kept"] = out.get(f"family.{fam}.kept", 0.0) + float(g["reason"].isna().sum())
    return out


@step("self_instruct", schema=Instructions, config="self_instruct", uses_llm=True, metrics=family_counts)
def self_instruct(seeds: pd.DataFrame, llm: LLM, cfg: SelfInstructConfig, seed: int) -> pd.DataFrame:
    """K sampled calls of the all-seeds prompt; parse, filter, dedup (exact, then near-duplicate) against the
    seeds and each other. Every line the model wrote is a row; dropped ones say why."""
    prompt = SELF_INSTRUCT_PROMPT.format(seeds="\n".join(f"- {s}" for s in seeds["instruction"]))
    near = NearDuplicateIndex(cfg.near_duplicate_threshold, cfg.shingle_words, cfg.minhash_perms, cfg.minhash_bands, seed)
    rows = []
    for r in seeds.itertuples():
        near.match_or_add(r.instruction_id, r.instruction)  # seeds are the reference set, never dropped here
        rows.append({"instruction_id": r.instruction_id, "instruction": r.instruction, "family": r.family,
                     "source": "seed", "duplicate_of": None, "reason": None})
    seen = set(seeds["instruction_id"])
    completions = llm.generate([prompt], n=cfg.n_calls, temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=seed)[0] if cfg.n_calls else []
    for k, completion in enumerate(completions):
        lines = parse_instruction_lines(completion)
        if not lines:
            rows.append({"instruction_id": f"call{k}-empty", "instruction": completion[: cfg.max_chars], "family": "augmented",
                         "source": "self_instruct", "duplicate_of": None, "reason": "no_instruction_lines"})
        for j, text in enumerate(lines):
            iid = instruction_id(text)
            reason, dup = junk_reason(text, cfg), None
            if reason is None and iid in seen:
                reason, dup = "duplicate", iid
            if reason is None:
                dup = near.match_or_add(iid, text)
                reason = "near_duplicate" if dup is not None else None
            rows.append({"instruction_id": iid if reason is None else f"call{k}-{j}-{iid}", "instruction": text if reason != "too_long" else text[: cfg.max_chars],
                         "family": "augmented", "source": "self_instruct", "duplicate_of": dup, "reason": reason})
            if reason is None:
                seen.add(iid)
    out = pd.DataFrame(rows, columns=["instruction_id", "instruction", "family", "source", "duplicate_of", "reason"])
    if cfg.max_instructions is not None:
        kept = out.index[out["reason"].isna()]
        out.loc[kept[cfg.max_instructions:], "reason"] = "over_limit"
    return out
