"""FollowBench (Jiang et al., ACL 2024): multi-level constraints, HSR/SSR per level 1-5 and CSL.

Data: the ``data/`` folder of the FollowBench repository (github.com/YJiangcm/FollowBench; also on the
Hugging Face hub as ``YJiangcm/FollowBench``), i.e. ``content_constraints.json``,
``situation_constraints.json`` (or ``scenario_constraints.json``), ``style_constraints.json``,
``format_constraints.json``, ``example_constraints.json`` and ``mixed_constraints.json``: JSON lists of
``{"example_id", "category", "source", "level", "instruction", "target"}``. Level 0 is the bare
instruction; level n adds n constraints. Nothing is downloaded: point ``eval.followbench_path`` at that
folder (or at one such file).

Scoring follows the reference code (``code/rule_based_evaluation.py``, ``code/gpt4_based_evaluation.py``):
- rule-checkable rows by code: the ``example`` category (the answer must fit the target template), the
  sources whose targets are checkable (E2E, WIKIEVENTS, CONLL2003, text_editing, cnn_dailymail, xsum,
  samsum, gigaword, arxiv, BBH_logical, BBH_time, self_made_space, gsm_8k) and format examples 22 and 30.
  A rule gives one verdict for the whole level, so hard = soft = that verdict (as in the reference).
- every other row by an LLM judge through the engine protocol, with the reference prompt (the
  instruction at each level up to n, the answer, "output a Python LIST with n elements ('YES' or 'NO')")
  and the reference parsing of its last line. hard = all n satisfied, soft = fraction satisfied.
  An unparseable judgement is recorded (``judge_parse_error``) and counts as not satisfied (the reference
  adds -1 and asks for a manual fix).
Metrics: ``hsr_level_n``/``ssr_level_n`` (n = 1..5) over all scored rows, the same per category, and
CSL (consistent satisfaction levels: per example, how many levels from level 1 are all satisfied).
"""
from __future__ import annotations

import ast
import json
import re
import string
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from autoif.evaluation.data import EvalDataError

LEVELS = (1, 2, 3, 4, 5)
COLUMNS = ["example_id", "category", "source", "level", "instruction", "target"]

RULE_SOURCES = frozenset(
    {
        "E2E", "WIKIEVENTS", "CONLL2003", "text_editing", "cnn_dailymail", "xsum", "samsum", "gigaword",
        "arxiv", "BBH_logical", "BBH_time", "self_made_space", "gsm_8k",
    }
)
RULE_FORMAT_EXAMPLES = frozenset({22, 30})

# How the judge prompt names each category's constraints (reference: {content,scenario,style,format,mix}_evaluation_prompt).
_CONSTRAINT_NOUN = {
    "content": "content constraint",
    "situation": "scenario constraint (information to describe a specific situation/background)",
    "scenario": "scenario constraint (information to describe a specific situation/background)",
    "style": "style constraint",
    "format": "format constraint",
    "mixed": "constraint",
}


# --- data -------------------------------------------------------------------------------------------------


def load_followbench(path: str | Path, categories: Sequence[str] | None = None) -> pd.DataFrame:
    """FollowBench rows from its ``data/`` folder (every ``*_constraint(s).json``) or from one JSON/JSONL file."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*_constraint*.json")) + sorted(p.glob("*_constraint*.jsonl"))
        if not files:
            raise EvalDataError(f"{p}: no *_constraints.json files (expected FollowBench's data/ folder)")
    elif p.exists():
        files = [p]
    else:
        raise EvalDataError(f"{p}: FollowBench data not found (get the data/ folder of github.com/YJiangcm/FollowBench)")
    rows: list[dict[str, Any]] = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        try:
            items = [json.loads(x) for x in text.splitlines() if x.strip()] if f.suffix == ".jsonl" else json.loads(text)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{f}: not valid JSON: {e}") from None
        if not isinstance(items, list):
            raise EvalDataError(f"{f}: expected a JSON list of rows")
        for i, it in enumerate(items):
            missing = [c for c in COLUMNS if c not in it and c != "target"]
            if missing:
                raise EvalDataError(f"{f}: row {i}: missing field(s) {missing}")
            level = int(it["level"])
            if level not in (0, *LEVELS):
                raise EvalDataError(f"{f}: row {i}: field 'level' must be 0..5, got {it['level']!r}")
            rows.append(
                {
                    "example_id": int(it["example_id"]),
                    "category": str(it["category"]),
                    "source": str(it["source"]),
                    "level": level,
                    "instruction": str(it["instruction"]),
                    "target": str(it.get("target") or ""),
                }
            )
    df = pd.DataFrame(rows, columns=COLUMNS)
    if categories:
        df = df[df["category"].isin(list(categories))].reset_index(drop=True)
    return df


def generation_prompts(data: pd.DataFrame) -> pd.DataFrame:
    """Rows to answer (levels 1-5; level 0 is never scored), as ``prompt`` = the instruction."""
    rows = data[data["level"] >= 1]
    return rows.assign(prompt=rows["instruction"])[["prompt"]].drop_duplicates(ignore_index=True)


# --- rules (reference: code/rule_based_evaluation.py) -----------------------------------------------------


def _contain_word(g: str, word: str) -> bool:
    return re.search(r"\b" + re.escape(word) + r"\b", g) is not None


def _sentences(g: str) -> list[str]:
    return [s for s in re.split(r"[.!?]", g) if s]


def _sentence_words_less(g: str, num: int) -> bool:
    return all(len(s.split()) < num for s in _sentences(g))


def _sentence_words_more(g: str, num: int) -> bool:
    return all(len(s.split()) > num for s in _sentences(g))


def _nth_sentence_contains(g: str, n: int, word: str) -> bool:
    s = _sentences(g)
    return len(s) >= n and _contain_word(s[n - 1], word)


def _nth_sentence_present_perfect(g: str, n: int) -> bool:
    s = _sentences(g)
    return len(s) >= n and re.search(r"\b(has|have)\s+\w+", s[n - 1]) is not None


def _present_continuous(g: str) -> bool:
    return re.search(r"\b(am|is|are)\s+\w+ing\b", g) is not None


def _paragraphs_start_with_number(g: str) -> bool:
    return all(re.match(r"\d+\.", p.lstrip()) for p in g.split("\n\n") if p.lstrip())


def _words(g: str) -> int:
    return len(g.split(" "))


def _levelled(checks: list[bool], level: int) -> bool:
    return all(checks[:level])


def _rule_source(source: str, g: str, target: str, level: int) -> bool:
    if source in ("E2E", "text_editing"):
        return g == target
    if source == "WIKIEVENTS":
        return all(line in target.split("\n") for line in g.split("\n"))
    if source == "CONLL2003":
        try:
            return g in ast.literal_eval(target)
        except (ValueError, SyntaxError):
            return False
    if source == "cnn_dailymail":
        return _levelled(
            [
                len(_sentences(g)) == 3,
                _sentence_words_less(g, 15),
                _nth_sentence_contains(g, 1, "Potter") and _nth_sentence_contains(g, 2, "actor")
                and _nth_sentence_contains(g, 3, "films"),
                not _nth_sentence_contains(g, 2, "lavish"),
                _nth_sentence_present_perfect(g, 3),
            ],
            level,
        )
    if source == "xsum":
        return _levelled(
            [len(_sentences(g)) == 1, _words(g) < 20, not _contain_word(g, "Newton Stewart"), _present_continuous(g),
             _contain_word(g, "operation")],
            level,
        )
    if source == "samsum":
        return _levelled(
            [len(_sentences(g)) == 1, _words(g) < 15, _contain_word(g, "stuff"),
             re.search(r"procrast", g, re.IGNORECASE) is None, sum(c in string.punctuation for c in g) == 1],
            level,
        )
    if source == "gigaword":
        return _levelled(
            [_words(g) == 8, not any(c in string.punctuation for c in g), g.islower(), not _contain_word(g, "bus"),
             _contain_word(g, "in")],
            level,
        )
    if source == "arxiv":
        return _levelled(
            [len(_sentences(g)) == 1, _words(g) <= 20, g[:2] == "We", _contain_word(g, "activations"),
             not _contain_word(g, "transformer")],
            level,
        )
    if source in ("BBH_logical", "BBH_time", "gsm_8k"):
        pattern = {"BBH_logical": r"\([A-Z]\)", "BBH_time": r"\d{2}/\d{2}/\d{4}", "gsm_8k": r"\$\d+"}[source]
        found = re.findall(pattern, g)
        return bool(found) and found[-1] == target
    if source == "self_made_space":
        return target in g
    raise KeyError(f"no rule for FollowBench source {source!r}")


def _rule_format(example_id: int, g: str, level: int) -> bool:
    if example_id == 22:
        paras = g.split("\n\n")
        three_short = len(paras) >= 3 and all(len(_sentences(p)) < 3 for p in paras[:3])
        if level <= 4:
            return _levelled(
                [len(paras) == 3, three_short, _sentence_words_more(g, 20), _paragraphs_start_with_number(g)], level
            )
        return (len(paras) == 4 and three_short and _sentence_words_more(g, 20) and _paragraphs_start_with_number(g)
                and g.endswith("Those are suggestions"))
    if example_id == 30:
        sentences = re.split(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=\.|\?)\s", g)
        keyword_sentences = [s for s in sentences if any(f"{n}." in s for n in range(1, 6))]
        return _levelled(
            [
                "**" in g,
                len(re.findall(r"\*\*[\d].+?:", g)) == 5,
                all(len(s.split(".")) < 3 for s in keyword_sentences),
                all(10 <= len(s.split()) <= 15 for s in sentences),
                all(not w.endswith("-ly") for s in sentences for w in s.split()),
            ],
            level,
        )
    raise KeyError(f"no rule for FollowBench format example {example_id}")


def template_match(target: str, generation: str) -> bool:
    """Example constraints: the answer must fit the target template, ``{answer}`` matching anything."""
    template = target.replace("{instruction}\n", "")
    pattern = template.replace("{{", "{").replace("}}", "}").replace("{answer}", ".*")
    pattern = re.escape(pattern).replace("\\.\\*", ".*")
    return re.fullmatch(pattern, generation) is not None


def is_rule_checkable(category: str, source: str, example_id: int) -> bool:
    return category == "example" or source in RULE_SOURCES or (category == "format" and example_id in RULE_FORMAT_EXAMPLES)


def rule_verdict(category: str, source: str, example_id: int, level: int, target: str, generation: str) -> bool:
    """The reference rule for a rule-checkable row (see :func:`is_rule_checkable`)."""
    if category == "example":
        return template_match(target, generation)
    if source in RULE_SOURCES:
        return _rule_source(source, generation, target, level)
    return _rule_format(example_id, generation, level)


# --- LLM judge (reference: code/gpt4_based_evaluation.py) -------------------------------------------------


def judge_prompt(category: str, evolve_instructions: Sequence[str], answer: str) -> str:
    """The reference discrimination prompt for level ``len(evolve_instructions) - 1``."""
    noun = _CONSTRAINT_NOUN.get(category, "constraint")
    level = len(evolve_instructions) - 1
    if level < 1:
        raise ValueError("a judge prompt needs the level-0 instruction and at least one constrained level")
    if level == 1:
        p = (f"Given an initial instruction, we add one {noun} and obtain the final instruction with 1 additional constraint.\n\n"
             f"#Initial Instruction#\n{evolve_instructions[0]}\n\n"
             f"#Initial Instruction + 1 constraint#\n{evolve_instructions[1]}\n\n"
             f"#Answer of Initial Instruction + 1 constraint#\n{answer}\n\n")
        return p + ("#System#\n1) Please identify the 1 added constraint.\n2) Please descriminate if the #Answer of Initial "
                    "Instruction + 1 constraint# satisfies the 1 added constraint.\n3) In the final line, only output a Python "
                    "LIST with 1 element ('YES' or 'NO') indicating whether the answer satisfies the 1 added constraint.")
    p = (f"Given an initial instruction, we add one {noun} per time and obtain the final instruction with {level} additional constraints.\n\n"
         f"#Initial Instruction#\n{evolve_instructions[0]}\n\n"
         f"#Initial Instruction + 1 constraint#\n{evolve_instructions[1]}\n\n")
    for i in range(2, level + 1):
        p += f"#Initial Instruction + {i} constraints#\n{evolve_instructions[i]}\n\n"
    p += f"#Answer of Initial Instruction + {level} constraints#\n{answer}\n\n"
    return p + (f"#System#\n1) Please identify all {level} added constraints.\n2) For the {level} added constraints, discriminate "
                f"if the #Answer of Initial Instruction + {level} constraints# satisfies each constraint.\n3) In the final line, "
                f"only output a Python LIST with {level} elements ('YES' or 'NO') indicating whether the answer satisfies each constraint.")


class JudgementParseError(ValueError):
    pass


def parse_judgement(text: str, level: int) -> tuple[int, float]:
    """``(hard, soft)`` from the judge's last line, as the reference parses it (without ``eval``)."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    if level == 1:
        if "YES" in last:
            return 1, 1.0
        if "NO" in last:
            return 0, 0.0
        raise JudgementParseError("level 1: last line holds neither YES nor NO")
    m = re.search(r"\[.*\]", last)
    if not m:
        raise JudgementParseError("last line holds no [...] list")
    try:
        items = ast.literal_eval(m.group())
    except (ValueError, SyntaxError) as e:
        raise JudgementParseError(f"list cannot be parsed: {e}") from None
    if not isinstance(items, (list, tuple)) or len(items) != level:
        raise JudgementParseError(f"expected a list of {level} elements, got {m.group()[:80]}")
    if any(x not in ("YES", "NO") for x in items):
        raise JudgementParseError("list elements must be 'YES' or 'NO'")
    n_yes = sum(x == "YES" for x in items)
    return int(n_yes == level), n_yes / level


# --- scoring ----------------------------------------------------------------------------------------------

SCORE_COLUMNS = [
    "example_id", "category", "source", "level", "instruction", "response", "method", "hard", "soft",
    "judge_output", "judge_parse_error",
]


def score_followbench(
    data: pd.DataFrame,
    responses: pd.DataFrame,
    llm: Any | None = None,
    judge_max_tokens: int = 1024,
    judge_temperature: float = 0.0,
    seed: int | None = 0,
) -> pd.DataFrame:
    """One row per scored (category, example, level 1..5): rule verdicts by code, the rest by ``llm`` as judge.

    ``responses`` is ``{"prompt", "response"}`` keyed by the instruction text (as the reference matches).
    Raises when a row needs the judge and ``llm`` is None, or when an instruction has no response.
    """
    resp = dict(zip(responses["prompt"], responses["response"]))
    by_example = {
        key: g.sort_values("level")["instruction"].tolist()
        for key, g in data.groupby(["category", "example_id"], sort=False)
    }
    rows: list[dict[str, Any]] = []
    judge_rows: list[int] = []
    judge_prompts: list[str] = []
    for rec in data[data["level"] >= 1].itertuples(index=False):
        if rec.instruction not in resp:
            raise KeyError(f"FollowBench {rec.category} example {rec.example_id} level {rec.level}: no response")
        g = resp[rec.instruction]
        row = {c: getattr(rec, c) for c in ["example_id", "category", "source", "level", "instruction"]}
        row.update(response=g, judge_output=None, judge_parse_error=None)
        if is_rule_checkable(rec.category, rec.source, rec.example_id):
            v = rule_verdict(rec.category, rec.source, rec.example_id, rec.level, rec.target, g)
            row.update(method="rule", hard=int(v), soft=float(v))
        else:
            evolve = by_example[(rec.category, rec.example_id)][: rec.level + 1]
            if len(evolve) != rec.level + 1:
                raise EvalDataError(
                    f"FollowBench {rec.category} example {rec.example_id}: level {rec.level} lacks its lower levels"
                )
            row.update(method="llm_judge", hard=0, soft=0.0)
            judge_rows.append(len(rows))
            judge_prompts.append(judge_prompt(rec.category, evolve, g))
        rows.append(row)
    if judge_prompts:
        if llm is None:
            raise ValueError(f"{len(judge_prompts)} FollowBench rows need an LLM judge and none was given")
        outs = llm.generate(judge_prompts, n=1, temperature=judge_temperature, max_tokens=judge_max_tokens, seed=seed)
        for i, out in zip(judge_rows, outs):
            text = out[0] if out else ""
            rows[i]["judge_output"] = text
            try:
                rows[i]["hard"], rows[i]["soft"] = parse_judgement(text, rows[i]["level"])
            except JudgementParseError as e:
                rows[i]["judge_parse_error"] = str(e)
    out = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    return out.astype({"example_id": "int64", "level": "int64", "hard": "int64", "soft": "float64"})


def csl(scores: pd.DataFrame) -> float:
    """Mean over examples with all five levels of the number of consecutive hard-satisfied levels from 1."""
    vals = []
    for _, g in scores.groupby(["category", "example_id"]):
        hard = g.set_index("level")["hard"].to_dict()
        if set(LEVELS) <= set(hard):
            n = 0
            for lv in LEVELS:
                if hard[lv] != 1:
                    break
                n += 1
            vals.append(n)
    return float(sum(vals) / len(vals)) if vals else float("nan")


def followbench_metrics(scores: pd.DataFrame) -> dict[str, float]:
    out: dict[str, float] = {}
    for lv in LEVELS:
        s = scores[scores["level"] == lv]
        out[f"hsr_level_{lv}"] = float(s["hard"].mean()) if len(s) else float("nan")
        out[f"ssr_level_{lv}"] = float(s["soft"].mean()) if len(s) else float("nan")
    out["hsr_avg"] = float(pd.Series([out[f"hsr_level_{lv}"] for lv in LEVELS]).mean())
    out["ssr_avg"] = float(pd.Series([out[f"ssr_level_{lv}"] for lv in LEVELS]).mean())
    out["csl"] = csl(scores)
    out["n_rows"] = float(len(scores))
    out["n_rule_rows"] = float((scores["method"] == "rule").sum())
    out["n_judge_rows"] = float((scores["method"] == "llm_judge").sum())
    out["n_judge_parse_errors"] = float(scores["judge_parse_error"].notna().sum())
    return out


def per_category_table(scores: pd.DataFrame) -> pd.DataFrame:
    """HSR and SSR per category and level (rows) plus the row count."""
    t = scores.groupby(["category", "level"]).agg(n=("hard", "size"), hsr=("hard", "mean"), ssr=("soft", "mean"))
    return t.reset_index()
