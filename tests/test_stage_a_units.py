"""Stage A pieces without Prefect: parsing untrusted LLM output, dedup, batching, judge parsing, NLI."""
import json

import pandas as pd
import pytest
from autoif.flows.steps import consistency_filter
from autoif.tasks.back_translation import parse_back_translation
from autoif.tasks.batching import group_batches
from autoif.tasks.consistency_filter import parse_judge_label
from autoif.tasks.self_instruct import NearDuplicateIndex, parse_instruction_lines
from autoif.tasks.verifier_synthesis import normalise_label, parse_verifier

from autoif.config import load_config

CFG = load_config(preset="code", overrides={"verifier_synthesis.max_func_chars": 200, "verifier_synthesis.max_case_chars": 20})
VCFG = CFG.verifier_synthesis
GOOD = "def evaluate(response):\n    return response.islower()"


def blob(func=GOOD, cases=None) -> str:
    return json.dumps({"func": func, "cases": cases if cases is not None else [{"input": "abc", "output": True}]})


@pytest.mark.parametrize("text, reason", [
    ("", "empty_completion"),
    ("I will not do that.", "no_json"),
    ("```json\n{\"func\": \"def evaluate(r): return 1\", \"cases\": [\n```", "invalid_json"),
    ("```json\n[1, 2]\n```", "json_not_object"),
    ('{"cases": []}', "missing_func"),
    ('{"func": "   ", "cases": []}', "missing_func"),
    ('{"func": ["def evaluate(r): pass"], "cases": []}', "func_not_string"),
    (blob("def evaluate(response):\n    return True  # " + "x" * 300), "func_too_long"),
    (blob("def evaluate(response)\n    return True"), "syntax_error"),
    (blob("def check(response):\n    return True"), "no_evaluate_function"),
    (blob("evaluate = lambda response: True"), "no_evaluate_function"),
])
def test_unusable_completions_are_rows_with_a_reason(text, reason):
    p = parse_verifier(text, VCFG)
    assert p.reason == reason and p.func is None


@pytest.mark.parametrize("text, repairs", [
    ("```json\n" + blob() + "\n```", []),
    (blob(), []),  # constrained decoding: bare JSON
    ("Sure:\n" + blob() + "\nHope it helps", ["unfenced"]),
    ("```python\n" + blob() + "\n```", ["fence_not_json"]),
    ("```json\n" + blob() + "\n", []),  # unclosed fence (truncated by max_tokens)
    ('{"func": "def evaluate(response):\n    return response.islower()", "cases": []}', ["control_chars"]),
    (r'''{"func": "def evaluate(response):\n    return response.replace('\'', '') == response", "cases": []}''', ["invalid_escape"]),
    ('{"func": "def evaluate(response):\\n    return True", "cases": [{"input": "x", "output": True},],}', ["trailing_comma_or_python_literal"]),
    ("{'func': 'def evaluate(response):\\n    return True', 'cases': []}", ["python_literal"]),
    (json.dumps({"func": "def evaluate(response):\\n    return True", "cases": []}), ["escaped_newlines"]),
    (json.dumps({"func": "```python\n" + GOOD + "\n```", "cases": []}), ["fence_in_func"]),
])
def test_common_faults_are_repaired(text, repairs):
    p = parse_verifier(text, VCFG)
    assert p.reason is None and p.func.startswith("def evaluate(response):") and p.repairs == repairs


def test_cases_are_normalised_and_bad_ones_counted():
    cases = [{"input": "a", "output": True}, {"input": "b", "output": "False"}, {"input": "c", "output": 1},
             {"input": "d", "output": " true "}, {"input": "e", "output": "maybe"}, {"input": 5, "output": True},
             {"input": "f"}, "not a case", {"input": "x" * 21, "output": True}, {"input": "g", "output": 2}]
    p = parse_verifier(blob(cases=cases), VCFG)
    assert p.reason is None
    assert p.cases == [{"input": "a", "output": True}, {"input": "b", "output": False}, {"input": "c", "output": True},
                       {"input": "d", "output": True}]
    assert p.case_errors == ["case_bad_label", "case_input_not_string", "case_missing_field", "case_not_object",
                             "case_input_too_long", "case_bad_label"]
    assert parse_verifier(json.dumps({"func": GOOD}), VCFG).case_errors == ["cases_missing"]
    assert parse_verifier(json.dumps({"func": GOOD, "cases": "none"}), VCFG).case_errors == ["cases_not_list"]
    assert [normalise_label(v) for v in (True, 0, "FALSE", "1", None, 2.0, [])] == [True, False, False, True, None, None, None]


def test_duplicates_share_a_key_across_formatting_and_comments():
    a = parse_verifier(blob("def evaluate(response):\n    return response.islower()"), VCFG)
    b = parse_verifier(blob("def evaluate(response):  # check\n\n    return (response.islower())\n"), VCFG)
    c = parse_verifier(blob("def evaluate(response):\n    return response.isupper()"), VCFG)
    assert a.func_key == b.func_key != c.func_key


def test_hostile_inputs_do_not_crash_the_parser():
    for text in ["{" * 5000 + "}" * 5000, "```json\n" + "[" * 100000, json.dumps({"func": "(" * 150 + ")" * 150}), "\x00\xff", None]:
        assert parse_verifier(text, VCFG).reason is not None


def test_instruction_lines_and_near_duplicates():
    assert parse_instruction_lines("intro\n- **Use  two hashtags.**\n* `quoted`\n2) third one\nno") == ["Use two hashtags.", "quoted", "third one"]
    ix = NearDuplicateIndex(0.8, 2, 64, 16)
    assert ix.match_or_add("a", "Answer in all lowercase letters.") is None
    assert ix.match_or_add("b", "Answer in all lowercase letters only.") == "a"  # bigram Jaccard 4/5
    assert ix.match_or_add("c", "Write exactly three bullet points.") is None
    assert ix.match_or_add("d", "answer, in ALL lowercase letters!") == "a"
    with pytest.raises(ValueError, match="multiple"):
        NearDuplicateIndex(0.8, 2, 64, 10)


def test_group_batches_keeps_groups_whole_across_input_frames():
    df = pd.DataFrame({"g": list("aabbbccdde"), "v": range(10)})
    frames = [df.iloc[0:3], df.iloc[3:4], df.iloc[4:8], df.iloc[8:8], df.iloc[8:10]]
    out = list(group_batches(iter(frames), "g", 2))
    assert [list(f["g"]) for f in out] == [list("aabbb"), list("ccdd"), list("e")]
    assert list(pd.concat(out)["v"]) == list(range(10))


def test_back_translation_and_judge_parsing():
    assert parse_back_translation('{"instructions": ["a", "b", "c", "d"]}', 3) == (["a", "b", "c"], None)
    assert parse_back_translation('Here:\n```json\n["Use lowercase."]\n```', 3) == (["Use lowercase."], None)
    assert parse_back_translation("['Use lowercase.', 'No capitals.']", 3) == (["Use lowercase.", "No capitals."], None)
    for bad in ["no list here", "[]", '{"instructions": [1, 2]}', '["", "x"]', None]:
        assert parse_back_translation(bad, 3) == (None, "back_translation_unparseable")
    assert parse_judge_label('{"label": "Contradiction"}') == "contradiction"
    assert parse_judge_label("The answer is entailment.") == "entailment"
    assert parse_judge_label('{"label": "yes"}') is None
    assert parse_judge_label("entailment or contradiction") is None


@pytest.fixture(scope="module")
def tiny_nli(tmp_path_factory):
    from tests.tiny_models import build_tiny_nli_classifier

    return build_tiny_nli_classifier(tmp_path_factory.mktemp("nli") / "model")


def _biased_copy(src, dst, favour: str, reorder: bool):
    """The tiny model with its classifier forced to always predict ``favour``; ``reorder`` permutes id2label so
    a code path that assumed AutoIF's fixed label order would read the wrong label."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(src)
    if reorder:
        labels = {0: "contradiction", 1: "entailment", 2: "neutral"}
        model.config.id2label, model.config.label2id = labels, {v: k for k, v in labels.items()}
    target = model.config.label2id[favour]
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([10.0 if i == target else 0.0 for i in range(3)]))
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return str(dst)


@pytest.mark.parametrize("favour, reorder, reason", [("contradiction", True, "contradiction"), ("entailment", True, None),
                                                     ("neutral", False, None)])
def test_nli_mode_uses_the_models_labels_and_loads_once(tiny_nli, tmp_path, favour, reorder, reason):
    from autoif.runtime import resources

    path = _biased_copy(tiny_nli, tmp_path / favour, favour, reorder)
    cfg = load_config(preset="code", overrides={"consistency_filter.mode": "nli", "consistency_filter.nli_model": path,
                                                "consistency_filter.nli_batch_size": 2, "consistency_filter.batch_size": 1})
    rows = pd.DataFrame({"instruction_id": ["i1", "i2"], "instruction": ["Answer in lowercase.", "Use no commas."],
                         "family": "case", "funcs": "[]", "func_accuracies": "[]", "cases": "[]",
                         "back_translations": [json.dumps(["Write in lowercase.", "No capitals."]), json.dumps(["Avoid commas."])],
                         "reason": None})
    section = cfg.consistency_filter
    nli = resources.nli(path)
    out = consistency_filter.pure(translated=iter([rows]), llm=None, nli=nli, cfg=section, seed=0)
    assert [json.loads(x) for x in out["labels"]] == [[favour, favour], [favour]]
    assert out["reason"].tolist() == [reason, reason]
    assert resources.nli(path) is nli  # one model per process and path, for every pair and batch


def test_a_code_fence_inside_a_json_string_does_not_cut_the_json_short():
    import json as _json

    body = _json.dumps({"func": GOOD, "cases": [{"input": "```json\n{}\n```", "output": False}, {"input": "abc", "output": True}]})
    p = parse_verifier("```json\n" + body + "\n```", VCFG)
    assert p.reason is None and p.func == GOOD and len(p.cases) == 2  # parsed whole, both cases kept
    assert "fence_inside_json" in p.repairs
