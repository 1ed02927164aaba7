"""Stage A end to end: canned LLM outputs through the real flow (Prefect, store, sandbox, MLflow).

Every instruction of the canned input is built to meet one fate; the test asserts exactly which instructions
and functions survive, each drop reason, that a re-run makes no LLM call, and that changing a
cross-validation threshold re-runs cross-validation and what follows but not synthesis.
"""
import json
from pathlib import Path

import pandas as pd
from autoif.flows.instructions import build_instructions
from autoif.tasks.back_translation import back_translation_prompt
from autoif.tasks.consistency_filter import JUDGE_PROMPT
from autoif.tasks.seeds import read_seeds
from autoif.tasks.self_instruct import SELF_INSTRUCT_PROMPT
from autoif.tasks.verifier_synthesis import verifier_prompt
from mlflow import MlflowClient

from autoif.store import Store

DATA = Path(__file__).parent / "data" / "stage_a"
SEEDS = DATA / "seeds.jsonl"

LOWER, BANANA, QUESTION = "Answer in all lowercase letters.", "Include the word 'banana' at least twice.", "End your response with a question mark."
APPLE, CHERRY, MANGO = "Include the word 'apple'.", "Include the word 'cherry'.", "Include the word 'mango'."
COMMAS, THREE = "Use no commas anywhere in your response.", "Write exactly three sentences."

SELF_INSTRUCT_OUTPUTS = [
    "Here you go:\n- Use no commas anywhere in your response.\n- answer in ALL lowercase letters!\n- Short\n- " + "x" * 400
    + "\n- Répondez en français, s'il vous plaît, ça c'est très élégant é è\n- \"**\"",
    "- use no commas anywhere in your response.\n- **Write exactly three sentences.**",
    "Sorry, I have no ideas today.",
]


def fence(func: str, cases: list[tuple]) -> str:
    return "```json\n" + json.dumps({"func": func, "cases": [{"input": i, "output": o} for i, o in cases]}) + "\n```"


def fn(body: str, imports: str = "") -> str:
    return f"{imports}def evaluate(response):\n    {body}"


LOWER_FUNCS = [fn("return response == response.lower()"), fn("return not any(ch.isupper() for ch in response)"),
               "def evaluate(response):\n    # the same as the first one\n    return (response == response.lower())",
               fn("return response.islower() and len(response) > 12")]


def word_funcs(w: str) -> list[str]:
    return [fn(f"return '{w}' in response.lower()"), fn(f"return response.lower().count('{w}') >= 1"),
            fn(f"return re.search(r'{w}', response, re.IGNORECASE) is not None", imports="import re\n")]


def word_cases(w: str, k: int) -> list[tuple]:
    return [(f"I like {w} number {k}.", True), (f"{w.upper()} pie, take {k}", True), (f"nothing here {k}", False), (f"plain text {k}", False)]


THREE_FUNCS = [fn("return response.count('.') == 3"), fn("return len(response.split('. ')) == 3"), fn("return response.count('!') == 3")]
THREE_CASES = [
    [("One. Two. Three.", True), ("One! Two! Three!", True), ("Dr. Smith came. He sat. He left.", True), ("Pi is 3.14. It is irrational. Nice!", True)],
    [("Wow! Great! Yes.", True), ("Just one.", False), ("A. B. C. D.", False), ("No! No! No!", True)],
    [("Ok... fine. Sure.", True), ("Yes!!! Yes! Yes!", True), ("Two sentences. Really!", False), ("Four. Five. Six. Seven!", False)],
]

COMPLETIONS = {
    LOWER: [
        fence(LOWER_FUNCS[0], [("hello world", True), ("Hello World", False), ("all good here", True)]),
        fence(LOWER_FUNCS[1], [("HELLO", False), ("fine thanks", True), ("Hello world", True)]),  # last label is wrong
        fence(LOWER_FUNCS[2], [("abc def", True), ("ABC def", False), ("xyz", True)]),  # a reformatted duplicate
        fence(LOWER_FUNCS[3], [("this is fine", True), ("NOPE NOPE", False), ("lower case text only", True)]),  # too strict
    ],
    BANANA: [
        fence(fn("return response.lower().count('banana') >= 2"), [("banana banana", True), ("one banana", False), ("none", False)]),
        fence("import os\n" + fn("return True"), [("banana and banana", True)]),  # module not allowed: compile error
        fence(fn("raise ValueError('no')"), [("bananas, bananas", True)]),  # fails on every input
        fence(fn("return True"), [("no fruit", False), ("banana banana banana", True)]),  # constant
    ],
    QUESTION: [
        fence(fn("return response.rstrip().endswith('?')"), [("Why?", True), ("Because.", False)]),
        fence(fn("return response.strip()[-1:] == '?'"), [("Why?", False), ("Really?", True)]),  # conflicting label
        fence(fn("return response.endswith('?')"), [("What now?", True), ("Now.", False), ("Ok", False)]),
        "```json\n{\"func\": \"def evaluate(r): return 1\", \"cases\": [\n```",  # truncated JSON
    ],
    APPLE: [fence(f, word_cases("apple", k)) for k, f in enumerate(word_funcs("apple"))] + ["I cannot help with that."],
    CHERRY: [fence(f, word_cases("cherry", k)) for k, f in enumerate(word_funcs("cherry"))] + ["```json\n[1, 2]\n```"],
    MANGO: [fence(f, word_cases("mango", k)) for k, f in enumerate(word_funcs("mango"))] + ['{"func": 42, "cases": []}'],
    COMMAS: [fence(f, [(f"no commas here {k}{j}", True) for j in range(4)]) for k, f in
             enumerate([fn("return ',' not in response"), fn("return response.count(',') == 0"), fn("return all(ch != ',' for ch in response)")])]
    + ['```json\n{"cases": [{"input": "a, b", "output": false}]}\n```'],
    THREE: [fence(f, c) for f, c in zip(THREE_FUNCS, THREE_CASES)] + [fence("def evaluate(response)\n    return True", [("x", True)])],
}

LOWER_BT = ["Write everything in lowercase letters.", "Do not use any uppercase letters."]
WORD_BT = {"cherry": ["Mention cherry.", "Use the word cherry at least once.", "Include cherry."],
           "mango": ["Include mango.", "Mention mango at least once.", "Use the word mango."]}
BACK_TRANSLATIONS = {
    LOWER: [json.dumps({"instructions": LOWER_BT})],
    APPLE: ["I think these check for apples."],  # unparseable
    CHERRY: ["```json\n" + json.dumps(WORD_BT["cherry"]) + "\n```"],  # a bare list in a fence is accepted
    MANGO: [json.dumps({"instructions": WORD_BT["mango"]})],
}
JUDGE = {
    (LOWER, LOWER_BT[0]): '{"label": "entailment"}', (LOWER, LOWER_BT[1]): '{"label": "neutral"}',
    (CHERRY, WORD_BT["cherry"][0]): '{"label": "entailment"}', (CHERRY, WORD_BT["cherry"][1]): "contradiction",
    (CHERRY, WORD_BT["cherry"][2]): '{"label": "entailment"}',
    (MANGO, WORD_BT["mango"][0]): '{"label": "entailment"}', (MANGO, WORD_BT["mango"][1]): "maybe?",
    (MANGO, WORD_BT["mango"][2]): '{"label": "entailment"}',
}
# With a looser function-accuracy threshold (>= 0.75) one three-sentence function (accuracy 7/9) survives.
THREE_BT = "Write three sentences separated by '. '."
EXTRA_FOR_LOOSE = {
    "bt": {(THREE_FUNCS[1],): [json.dumps({"instructions": [THREE_BT]})]},
    "judge": {(THREE, THREE_BT): '{"label": "entailment"}'},
}


def script(cfg) -> list[dict]:
    seeds = read_seeds(SEEDS)
    records = [{"prompt": SELF_INSTRUCT_PROMPT.format(seeds="\n".join(f"- {s}" for s in seeds["instruction"])), "outputs": SELF_INSTRUCT_OUTPUTS}]
    records += [{"prompt": verifier_prompt(i, cfg.verifier_synthesis), "outputs": outs} for i, outs in COMPLETIONS.items()]
    survivors = {LOWER: LOWER_FUNCS[:2], APPLE: word_funcs("apple"), CHERRY: word_funcs("cherry"), MANGO: word_funcs("mango")}
    records += [{"prompt": back_translation_prompt(survivors[i]), "outputs": outs} for i, outs in BACK_TRANSLATIONS.items()]
    records += [{"prompt": back_translation_prompt(list(fs)), "outputs": outs} for fs, outs in EXTRA_FOR_LOOSE["bt"].items()]
    judge = {**JUDGE, **EXTRA_FOR_LOOSE["judge"]}
    records += [{"prompt": JUDGE_PROMPT.format(premise=p, hypothesis=h), "outputs": [o]} for (p, h), o in judge.items()]
    return records


OVERRIDES = {"run_name": "stage-a", "self_instruct.seeds_path": str(SEEDS), "self_instruct.n_calls": 3,
             "verifier_synthesis.n_completions": 4, "verifier_synthesis.batch_size": 3, "cross_validation.batch_size": 3,
             "back_translation.batch_size": 2, "consistency_filter.batch_size": 2, "consistency_filter.mode": "llm_judge"}


def frame(store: Store, ref) -> pd.DataFrame:
    return store.read_step(ref)[0]


def by_instruction(df: pd.DataFrame) -> dict:
    return {i: (None if pd.isna(r) else r) for i, r in df["reason"].items()}


def reasons(df: pd.DataFrame) -> dict:
    return df["reason"].value_counts().to_dict()


def test_stage_a_canned_funnel_cache_and_threshold_change(prefect_harness, make_cfg):
    cfg = make_cfg(OVERRIDES)
    cfg = make_cfg(OVERRIDES, script=script(cfg))
    refs = build_instructions(cfg)
    store = Store(cfg.store.root)

    # 1. self-instruct: every line is a row, dropped ones say why
    inst = frame(store, refs["self_instruct"])
    assert reasons(inst) == {"near_duplicate": 1, "too_short": 1, "too_long": 1, "non_english": 1, "empty": 1,
                             "duplicate": 1, "no_instruction_lines": 1}
    kept = inst[inst.reason.isna()]
    assert list(kept.instruction) == [LOWER, BANANA, QUESTION, APPLE, CHERRY, MANGO, COMMAS, THREE]
    assert inst.loc[inst.reason == "near_duplicate", "duplicate_of"].tolist() == kept.loc[kept.instruction == LOWER, "instruction_id"].tolist()

    # 2. synthesis: one row per completion; unusable ones dropped with the reason
    cand = frame(store, refs["verifier_synthesis"])
    assert len(cand) == 8 * 4 and cand.groupby("instruction_id").ngroups == 8
    assert reasons(cand) == {"invalid_json": 1, "no_json": 1, "json_not_object": 1, "func_not_string": 1,
                             "missing_func": 1, "syntax_error": 1}
    assert len(refs["verifier_synthesis"].uri) and store.manifest("stage-a", "verifier_synthesis", refs["verifier_synthesis"].key).files.keys() == {
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"}  # streamed: one part per 3 instructions

    # 3. cross-validation: exact survivors, a reason per dropped instruction, function and case
    cv = frame(store, refs["cross_validation"]).set_index("instruction")
    assert by_instruction(cv) == {LOWER: None, BANANA: "too_few_functions", QUESTION: "too_few_cases", APPLE: None,
                                      CHERRY: None, MANGO: None, COMMAS: "one_label_cases", THREE: "no_surviving_function"}
    assert json.loads(cv.loc[LOWER, "funcs"]) == LOWER_FUNCS[:2]
    assert json.loads(cv.loc[LOWER, "func_accuracies"]) == [1.0, 1.0]
    lower_report = {f["completion"]: (f["reason"], f["accuracy"]) for f in json.loads(cv.loc[LOWER, "func_report"])}
    assert lower_report == {0: (None, 1.0), 1: (None, 1.0), 2: ("duplicate_function", None), 3: ("low_accuracy", 6 / 11)}
    lower_cases = {c["input"]: (c["reason"], c["agreement"]) for c in json.loads(cv.loc[LOWER, "case_report"])}
    assert lower_cases["Hello world"] == ("low_agreement", 0.0) and lower_cases["hello world"] == (None, 2 / 3)
    assert cv.loc[LOWER, "n_cases"] == 12 and cv.loc[LOWER, "n_cases_kept"] == 11
    assert [f["reason"] for f in json.loads(cv.loc[BANANA, "func_report"])] == ["instruction_dropped", "compile_error", "always_error", "constant_verdict"]
    assert {c["input"]: c["reason"] for c in json.loads(cv.loc[QUESTION, "case_report"])}["Why?"] == "conflicting_labels"
    three = {f["completion"]: f["reason"] for f in json.loads(cv.loc[THREE, "func_report"])}
    assert three == {0: "low_accuracy", 1: "low_accuracy", 2: "low_accuracy"}
    for word in ("apple", "cherry", "mango"):
        assert json.loads(cv.loc[f"Include the word '{word}'.", "funcs"]) == word_funcs(word)

    # 4. back-translation and the consistency filter (LLM-judge mode)
    bt = frame(store, refs["back_translation"]).set_index("instruction")
    assert by_instruction(bt) == {LOWER: None, APPLE: "back_translation_unparseable", CHERRY: None, MANGO: None}
    final = frame(store, refs["consistency_filter"]).set_index("instruction")
    assert by_instruction(final) == {LOWER: None, CHERRY: "contradiction", MANGO: "judge_unparseable"}
    assert json.loads(final.loc[LOWER, "labels"]) == ["entailment", "neutral"]
    assert json.loads(final.loc[LOWER, "funcs"]) == LOWER_FUNCS[:2]
    assert {(c["input"], c["output"]) for c in json.loads(final.loc[LOWER, "cases"])} >= {("HELLO", False), ("hello world", True)}

    # MLflow: funnel per step, distributions, survival per family, the funnel plot
    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`autoif.flow` = 'instructions'", order_by=["start_time DESC"])
    m = runs[0].data.metrics
    assert m["llm_prompts"] == 1 + 8 + 4 + 8  # self-instruct, synthesis, back-translation, judge pairs
    assert m["cross_validation.rows_out"] == 4 and m["cross_validation.dropped.too_few_cases"] == 1
    assert m["cross_validation.funcs.constant_verdict"] == 1 and m["cross_validation.cases.conflicting_labels"] == 2
    assert m["cross_validation.func_accuracy.count"] == 15 and not [k for k in m if ".bin_" in k]
    hist = client.load_table(exp.experiment_id, "histograms/cross_validation.json", run_ids=[runs[0].info.run_id])
    acc = hist[hist["histogram"] == "func_accuracy"].set_index("bin")["count"]
    assert acc[0.9] == 11 and acc.sum() == 15  # the distribution is one table, a row per bin
    assert m["survival.case"] == 1.0 and m["survival.keywords"] == 0.0 and m["survival.augmented"] == 0.0
    assert "funnel.png" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}

    # re-run with identical config: every step reused, no LLM call
    again = build_instructions(cfg)
    assert again == refs
    runs = client.search_runs([exp.experiment_id], "tags.`autoif.flow` = 'instructions'", order_by=["start_time DESC"])
    assert runs[0].data.metrics["llm_requests"] == 0.0

    # only a cross-validation threshold changes: synthesis reused, cross-validation and what follows re-run
    loose = make_cfg({**OVERRIDES, "cross_validation.func_accuracy": 0.75})
    changed = build_instructions(loose)
    for name in ("seeds", "self_instruct", "verifier_synthesis"):
        assert changed[name] == refs[name]
    for name in ("cross_validation", "back_translation", "consistency_filter"):
        assert changed[name].key != refs[name].key
    runs = client.search_runs([exp.experiment_id], "tags.`autoif.flow` = 'instructions'", order_by=["start_time DESC"])
    assert runs[0].data.metrics["llm_prompts"] == 5 + 9  # back-translation of 5 survivors, judge on 9 pairs; no synthesis
    cv2 = frame(store, changed["cross_validation"]).set_index("instruction")
    assert json.loads(cv2.loc[LOWER, "funcs"]) == LOWER_FUNCS[:2]  # the too-strict function (6/11) still fails
    assert json.loads(cv2.loc[THREE, "funcs"]) == [THREE_FUNCS[1]]
    assert json.loads(cv2.loc[THREE, "func_accuracies"]) == [7 / 9]
    final2 = frame(store, changed["consistency_filter"]).set_index("instruction")
    assert by_instruction(final2) == {LOWER: None, CHERRY: "contradiction", MANGO: "judge_unparseable", THREE: None}


def test_failed_batch_resumes_from_that_batch(prefect_harness, make_cfg, tmp_path):
    """Synthesis runs as one Prefect task run per batch ("verifier_synthesis[b]"); when batch 2 fails, the
    re-run answers batches 0 and 1 from the cache and asks the LLM only for batch 2."""
    import asyncio

    import pytest
    from prefect.client.orchestration import get_client

    from autoif.llm.scripted import MissingScriptError
    from autoif.runtime import StepFailed
    from tests.conftest import write_script

    overrides = {**OVERRIDES, "run_name": "stage-a-resume"}
    cfg = make_cfg(overrides)
    full = script(cfg)
    broken = [r for r in full if r["prompt"] != verifier_prompt(THREE, cfg.verifier_synthesis)]  # batch 2 = COMMAS, THREE
    cfg = make_cfg(overrides, script=broken)
    with pytest.raises(StepFailed) as failed:
        build_instructions(cfg, until="verifier_synthesis")
    assert failed.value.step == "verifier_synthesis" and failed.value.batch == 2
    assert isinstance(failed.value.cause, MissingScriptError)
    write_script(tmp_path / "script.jsonl", full)
    refs = build_instructions(cfg, until="verifier_synthesis")

    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`autoif.run_name` = 'stage-a-resume' and tags.`autoif.flow` = 'instructions'",
                              order_by=["start_time DESC"])
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED"]
    assert runs[1].data.metrics["llm_prompts"] == 1 + 3 + 3  # self-instruct, batches 0 and 1; batch 2 raised
    assert runs[0].data.metrics["llm_prompts"] == 2  # only batch 2 (COMMAS, THREE)
    cand = Store(cfg.store.root).read_step(refs["verifier_synthesis"])[0]
    assert len(cand) == 8 * 4

    async def task_runs():
        async with get_client() as c:
            return await c.read_task_runs()

    states: dict[str, list[str]] = {}
    for t in sorted(asyncio.run(task_runs()), key=lambda t: t.created):
        states.setdefault(t.name, []).append(t.state.name)
    assert states["verifier_synthesis[0]"][-2:] == ["Completed", "Cached"]
    assert states["verifier_synthesis[2]"][-2:] == ["Failed", "Completed"]
