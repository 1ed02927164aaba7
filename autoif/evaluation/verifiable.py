"""IFEval and IFBench scoring: the reference checkers, per instruction, strict and loose.

The verdict of each instruction is computed exactly as the reference ``evaluation_lib`` does (Google's
IFEval; AllenAI's IFBench, which copies it): build the checker from the row's kwargs (plus the prompt
when the checker asks for it), strict = the checker passes on the response, loose = it passes on any of
eight variants (the response, without its first and/or last line, each with ``*`` removed); an empty
response fails. The reference checker classes themselves are used (:mod:`.reference`).

Differences from the reference are additions, never changes of a verdict the reference gives:
- a checker that raises is recorded in ``error`` and counts as not followed (the reference crashes);
- a checker that needs NLTK data nobody installed (IFBench's ``words:start_verb`` needs
  ``averaged_perceptron_tagger_eng``) is *unscored*: its verdicts are null, and its prompt (all of its
  instructions) is left out of the four numbers and the per-type table, exactly as if the reference
  had been run on the prompts it can score; ``n_unscored_prompts`` counts them.

Outputs are frames: one row per (prompt, instruction) from :func:`score_instructions`, then
:func:`prompt_table`, :func:`metrics` and :func:`per_type_table` derived from it.
"""
from __future__ import annotations

import contextlib
import logging
import random
import re
from pathlib import Path
from typing import Iterator, Mapping

import pandas as pd

from autoif.evaluation.data import Benchmark
from autoif.evaluation.reference import checker_registry

log = logging.getLogger(__name__)

INSTRUCTION_COLUMNS = [
    "key",
    "prompt",
    "response",
    "instruction_index",
    "instruction_id",
    "instruction_group",
    "strict",
    "loose",
    "error",
]


class MissingResponses(ValueError):
    """Some benchmark prompts have no response; the message counts them and shows the first."""


def loose_variants(response: str) -> list[str]:
    """The eight responses the reference's loose mode tries, in its order."""
    lines = response.split("\n")
    remove_first = "\n".join(lines[1:]).strip()
    remove_last = "\n".join(lines[:-1]).strip()
    remove_both = "\n".join(lines[1:-1]).strip()
    return [
        response,
        response.replace("*", ""),
        remove_first,
        remove_last,
        remove_both,
        remove_first.replace("*", ""),
        remove_last.replace("*", ""),
        remove_both.replace("*", ""),
    ]


def _build(cls: type, instruction_id: str, kwargs: dict, prompt: str):
    checker = cls(instruction_id)
    checker.build_description(**kwargs)
    args = checker.get_instruction_args()
    if args and "prompt" in args:
        checker.build_description(prompt=prompt)
    return checker


def _follows(checker, response: str) -> bool:
    return bool(response.strip() and checker.check_following(response))


@contextlib.contextmanager
def seeded_random(seed: int) -> Iterator[None]:
    """Seed Python's global ``random`` (the checkers draw from it), restoring the caller's state after."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def _verdict(cls: type, iid: str, kwargs: dict, prompt: str, responses: list[str]) -> tuple[bool | None, str | None]:
    try:
        checker = _build(cls, iid, kwargs, prompt)
        return any(_follows(checker, r) for r in responses), None
    except LookupError as e:  # NLTK resource not installed: cannot be scored offline
        m = re.search(r"Resource '?([\w./-]+)'? not found", str(e))
        return None, f"unscored: NLTK resource {m.group(1) if m else str(e)[:200]!r} is not installed"
    except Exception as e:  # noqa: BLE001  the checker crashed on this response: recorded, counts as not followed
        return False, f"{type(e).__name__}: {e}"[:500]


def check_prompt(
    registry: Mapping[str, type],
    key: int,
    prompt: str,
    instruction_ids: list[str],
    kwargs_list: list[dict],
    response: str,
) -> list[tuple[bool | None, bool | None, str | None]]:
    """``(strict, loose, error)`` per instruction of one prompt, in the reference's order of work.

    A few benchmark rows carry kwargs the checker rejects (IFEval key 1122 asks for the "letter" ``#``),
    and then the reference checker draws a random value. Python's ``random`` is seeded with the prompt
    key before the strict pass and again before the loose pass, so those verdicts are reproducible (and
    equal the reference's when it is run with the same seed).
    """
    kws = [{k: v for k, v in kw.items() if v is not None} for kw in kwargs_list]
    variants = loose_variants(response)
    with seeded_random(key):
        strict = [_verdict(registry[i], i, kw, prompt, [response]) for i, kw in zip(instruction_ids, kws)]
    with seeded_random(key):
        loose = [_verdict(registry[i], i, kw, prompt, variants) for i, kw in zip(instruction_ids, kws)]
    return [(s, lo, es or el) for (s, es), (lo, el) in zip(strict, loose)]


def attach_responses(prompts: pd.DataFrame, responses: pd.DataFrame, allow_missing: bool = False) -> pd.DataFrame:
    """Prompts with their response (joined on the prompt text, as the reference does)."""
    merged = prompts.merge(responses[["prompt", "response"]], on="prompt", how="left")
    missing = merged["response"].isna()
    if missing.any():
        if not allow_missing:
            raise MissingResponses(
                f"{int(missing.sum())} of {len(merged)} prompts have no response "
                f"(first: key {merged.loc[missing, 'key'].iloc[0]}, {merged.loc[missing, 'prompt'].iloc[0][:80]!r})"
            )
        log.warning("%d prompts have no response: scored as empty responses", int(missing.sum()))
        merged["response"] = merged["response"].fillna("")
    return merged


def score_instructions(
    prompts: pd.DataFrame,
    responses: pd.DataFrame,
    benchmark: Benchmark | str,
    registry: Mapping[str, type] | None = None,
    allow_missing: bool = False,
    cache_dir: Path | None = None,
) -> pd.DataFrame:
    """One row per (prompt, instruction): strict and loose verdicts of the reference checker."""
    b = Benchmark(benchmark)
    reg = registry if registry is not None else checker_registry(b.value, cache_dir)
    merged = attach_responses(prompts, responses, allow_missing)
    unknown = sorted({i for ids in merged["instruction_id_list"] for i in ids} - set(reg))
    if unknown:
        raise KeyError(f"{b.value}: instruction ids unknown to the reference checkers: {unknown}")
    rows = []
    for rec in merged.itertuples(index=False):
        verdicts = check_prompt(reg, rec.key, rec.prompt, list(rec.instruction_id_list), list(rec.kwargs), rec.response)
        for idx, (iid, (strict, loose, error)) in enumerate(zip(rec.instruction_id_list, verdicts)):
            rows.append((rec.key, rec.prompt, rec.response, idx, iid, iid.split(":")[0], strict, loose, error))
    out = pd.DataFrame(rows, columns=INSTRUCTION_COLUMNS)
    out["strict"] = out["strict"].astype("boolean")
    out["loose"] = out["loose"].astype("boolean")
    out["key"] = out["key"].astype("int64")
    out["instruction_index"] = out["instruction_index"].astype("int64")
    return out


def prompt_table(instructions: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt: all instructions followed (strict/loose), null when any is unscored."""
    g = instructions.groupby(["key", "prompt", "response"], sort=False)
    out = g.agg(
        n_instructions=("instruction_id", "size"),
        n_unscored=("strict", lambda s: int(s.isna().sum())),
        strict_followed=("strict", lambda s: int(s.fillna(False).sum())),
        loose_followed=("loose", lambda s: int(s.fillna(False).sum())),
    ).reset_index()
    scored = out["n_unscored"] == 0
    out["strict"] = (out["strict_followed"] == out["n_instructions"]).where(scored).astype("boolean")
    out["loose"] = (out["loose_followed"] == out["n_instructions"]).where(scored).astype("boolean")
    return out


def _in_scored_prompts(instructions: pd.DataFrame) -> pd.Series:
    unscored_keys = set(instructions.loc[instructions["strict"].isna(), "key"])
    return ~instructions["key"].isin(unscored_keys)


def metrics(instructions: pd.DataFrame) -> dict[str, float]:
    """The four IFEval numbers plus counts, over the prompts whose instructions could all be scored."""
    prompts = prompt_table(instructions)
    scored_i = _in_scored_prompts(instructions)
    scored_p = prompts["strict"].notna()

    def mean(s: pd.Series) -> float:
        return float(s.astype(bool).mean()) if len(s) else float("nan")

    return {
        "prompt_level_strict_acc": mean(prompts.loc[scored_p, "strict"]),
        "inst_level_strict_acc": mean(instructions.loc[scored_i, "strict"]),
        "prompt_level_loose_acc": mean(prompts.loc[scored_p, "loose"]),
        "inst_level_loose_acc": mean(instructions.loc[scored_i, "loose"]),
        "n_prompts": float(len(prompts)),
        "n_instructions": float(len(instructions)),
        "n_unscored_instructions": float(instructions["strict"].isna().sum()),
        "n_unscored_prompts": float((~scored_p).sum()),
        "n_checker_errors": float((instructions["error"].notna() & scored_i).sum()),
        "n_empty_responses": float((prompts["response"].str.strip() == "").sum()),
    }


def per_type_table(instructions: pd.DataFrame, level: str = "instruction_id") -> pd.DataFrame:
    """Accuracy per instruction type (``instruction_id``) or group (``instruction_group``), scored prompts only."""
    scored = instructions[_in_scored_prompts(instructions)]
    t = scored.groupby(level).agg(
        n=("strict", "size"),
        strict_acc=("strict", lambda s: float(s.astype(bool).mean())),
        loose_acc=("loose", lambda s: float(s.astype(bool).mean())),
    )
    unscored = instructions[instructions["strict"].isna()].groupby(level).size().rename("n_unscored")
    t = t.join(unscored, how="outer").fillna({"n": 0, "n_unscored": 0})
    t["n"] = t["n"].astype("int64")
    t["n_unscored"] = t["n_unscored"].astype("int64")
    return t.reset_index().sort_values(level, ignore_index=True)
