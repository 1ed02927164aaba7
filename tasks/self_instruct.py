"""Step 1: self-instruct. All seeds go into one prompt asking for many new format instructions, sampled K
times; the lines are parsed, filtered and deduplicated (exact, then near-duplicate) against the seeds."""
from __future__ import annotations

import hashlib
import re

import numpy as np
import pandas as pd
from autoif.tasks.ids import instruction_id

from autoif.config import SelfInstructConfig
from autoif.llm import LLM

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
