"""The shipped seeds' reference verifiers (``func``/``cases`` in ``autoif/data/seeds.jsonl``), run in the real sandbox."""
from __future__ import annotations

import ast
import json
from importlib import resources

import pytest

from autoif.sandbox import DEFAULT_ALLOWED_MODULES, Outcome, Sandbox

REFERENCE_MODULES = {"re", "json", "string", "collections", "math", "unicodedata", "itertools"}


def _jsonl(name: str) -> list[dict]:
    text = (resources.files("autoif") / "data" / name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


SEEDS = _jsonl("seeds.jsonl")
PROBES = [p["response"] for p in _jsonl("probes.jsonl")]
IDS = [f"{i:02d}-{s.get('family')}" for i, s in enumerate(SEEDS, 1)]


@pytest.fixture(scope="module")
def verdicts() -> dict[int, tuple[list, list]]:
    """Per seed index: (results on its cases, results on the probes), from one sandbox run of all seeds."""
    inputs: list[str] = list(PROBES)
    pairs, spans = [], {}
    for i, seed in enumerate(SEEDS):
        start = len(pairs)
        for case in seed["cases"]:
            inputs.append(case["input"])
            pairs.append((i, len(inputs) - 1))
        pairs += [(i, j) for j in range(len(PROBES))]
        spans[i] = (start, start + len(seed["cases"]), len(pairs))
    with Sandbox(timeout_s=2.0) as sb:
        results = sb.run([s["func"] for s in SEEDS], inputs, pairs)
    return {i: (results[a:b], results[b:c]) for i, (a, b, c) in spans.items()}


def test_every_seed_has_a_reference():
    assert len(SEEDS) >= 36
    for i, seed in enumerate(SEEDS, 1):
        assert list(seed) == ["family", "instruction", "func", "cases"], f"line {i}: keys {list(seed)}"
        assert isinstance(seed["instruction"], str) and seed["instruction"].strip()
    assert len({s["instruction"] for s in SEEDS}) == len(SEEDS)


@pytest.mark.parametrize("index", range(len(SEEDS)), ids=IDS)
def test_cases_are_well_formed_with_near_misses_on_both_sides(index):
    cases = SEEDS[index]["cases"]
    assert isinstance(cases, list) and len(cases) >= 6
    for case in cases:
        assert set(case) == {"input", "output"} and isinstance(case["input"], str) and isinstance(case["output"], bool)
    assert sum(c["output"] for c in cases) >= 2
    assert sum(not c["output"] for c in cases) >= 2
    assert len({c["input"] for c in cases}) == len(cases), "duplicate case inputs"


@pytest.mark.parametrize("index", range(len(SEEDS)), ids=IDS)
def test_reference_imports_only_allowed_modules(index):
    tree = ast.parse(SEEDS[index]["func"])
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert modules <= REFERENCE_MODULES & set(DEFAULT_ALLOWED_MODULES), modules
    assert any(isinstance(n, ast.FunctionDef) and n.name == "evaluate" for n in tree.body)


@pytest.mark.parametrize("index", range(len(SEEDS)), ids=IDS)
def test_reference_agrees_with_its_cases_in_the_sandbox(verdicts, index):
    on_cases, on_probes = verdicts[index]
    broken = [(r.input_index, r.outcome.value, r.detail) for r in on_cases + on_probes
              if r.outcome not in (Outcome.passed, Outcome.failed)]
    assert not broken, f"{SEEDS[index]['instruction']!r}: did not return a bool: {broken[:3]}"
    wrong = [(c["input"][:80], c["output"], r.value) for c, r in zip(SEEDS[index]["cases"], on_cases)
             if r.value is not c["output"]]
    assert not wrong, f"{SEEDS[index]['instruction']!r}: (input, expected, got) {wrong}"


@pytest.mark.parametrize("index", range(len(SEEDS)), ids=IDS)
def test_reference_is_not_constant(verdicts, index):
    on_cases, on_probes = verdicts[index]
    assert len({r.value for r in on_cases + on_probes}) == 2, SEEDS[index]["instruction"]


@pytest.mark.parametrize("index", range(len(SEEDS)), ids=IDS)
def test_a_blank_response_follows_no_instruction(verdicts, index):
    # IFEval's scorer fails an empty response whatever the instruction; the references agree
    _, on_probes = verdicts[index]
    blank = [r for r, p in zip(on_probes, PROBES) if not p.strip()]
    assert blank and all(r.value is False for r in blank), SEEDS[index]["instruction"]
