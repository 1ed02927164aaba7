"""Stage B end to end with canned LLM outputs: queries, K responses, verification in the sandbox, the score
filter, the contamination check, exact SFT rows and DPO pairs (the 2 x 2 cap, the both-sides rule, the
instruction-level pairs), on the real flow (Prefect, store, sandbox, MLflow)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from autoif.flows.data import build_data
from autoif.tasks.quality_filter import score_prompt
from autoif.tasks.query_augmentation import response_prompt
from mlflow import MlflowClient

from autoif.evaluation.data import Benchmark, default_prompts_path, load_prompts
from autoif.store import Store
from tests.test_stage_a_flow import LOWER, OVERRIDES, script

Q1, Q2 = "How do I keep basil alive on a windowsill?", "What is a good way to start learning chess?"
Q3, Q4 = "Why does bread go stale so quickly at home?", "Can you explain what a mortgage rate is?"


def ifeval_words() -> str:
    """A lowercase text sharing a 13-word sequence with an IFEval prompt (so it must be dropped)."""
    p = load_prompts(Benchmark.ifeval, default_prompts_path(Benchmark.ifeval))["prompt"].iloc[0]
    return " ".join(p.lower().replace(",", " ").split()[:16])


CONTAMINATED = ifeval_words()
RESPONSES = {  # per query: 4 responses; lowercase ones pass both lowercase functions (pass rate 1), others 0
    Q1: ["keep it in sun and water it often.", "give it light, and pinch the tops.", "Basil Needs Light.", "WATER IT."],
    Q2: ["learn the moves, then play a lot.", "solve puzzles every day.", "study openings slowly.", "Play Online."],
    Q3: ["air dries the crumb.", "starch crystallises as it cools.", "store it in a bag.", CONTAMINATED],
    Q4: ["It Is The Interest.", "A Price For Money.", "Ask Your Bank.", "RATES VARY."],
}
SCORES = {  # (query, response) -> the judge's answer; missing = never asked (failed verification)
    (Q1, RESPONSES[Q1][0]): '{"analysis": "helpful", "score": 9}',
    (Q1, RESPONSES[Q1][1]): "It answers the query well.\nScore: 10",
    (Q2, RESPONSES[Q2][0]): '{"analysis": "fine", "score": 9}',
    (Q2, RESPONSES[Q2][1]): '{"analysis": "good", "score": 10}',
    (Q2, RESPONSES[Q2][2]): '{"analysis": "short", "score": 7}',  # low score: not SFT, not chosen
    (Q3, RESPONSES[Q3][0]): '{"analysis": "ok", "score": 9}',
    (Q3, RESPONSES[Q3][1]): "I cannot decide.",  # no score: dropped
    (Q3, RESPONSES[Q3][2]): '{"analysis": "ok", "score": 12}',  # out of range: dropped
    # Q3's 4th response is contaminated: dropped before scoring (never asked)
}


def stage_b_script(cfg, queries_file: Path) -> list[dict]:
    records = script(cfg)
    for q, outs in RESPONSES.items():
        records.append({"prompt": response_prompt(LOWER, q), "outputs": outs})
    for (q, r), out in SCORES.items():
        records.append({"prompt": score_prompt(LOWER, q, r), "outputs": [out]})
    return records


@pytest.fixture
def stage_b_cfg(make_cfg, tmp_path):
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"query": q, "category": "advice"}) + "\n"
                               for q in [Q1, Q2, "too short", Q3, Q4, Q1.upper()]))
    overrides = {**OVERRIDES, "run_name": "stage-b", "queries.path": str(queries), "query_augmentation.queries_per_instruction": 4,
                 "response_generation.n_responses": 4, "response_generation.batch_size": 2, "verification.batch_size": 5,
                 "quality_filter.batch_size": 3}
    cfg = make_cfg(overrides)
    return make_cfg(overrides, script=stage_b_script(cfg, queries))


def test_stage_b_canned_training_data(prefect_harness, stage_b_cfg):
    cfg = stage_b_cfg
    refs = build_data(cfg)
    store = Store(cfg.store.root)
    frame = lambda name: store.read_step(refs[name])[0]  # noqa: E731

    q = frame("queries")
    assert q.reason.value_counts().to_dict() == {"too_short": 1, "duplicate": 1}
    pairs = frame("query_augmentation")
    assert sorted(pairs["query"]) == sorted([Q1, Q2, Q3, Q4]) and set(pairs.instruction) == {LOWER}
    assert (pairs.verifier_source == "synthesized").all()

    responses = frame("response_generation")
    assert len(responses) == 16 and responses.reason.isna().all()
    verified = frame("verification").set_index("response")
    assert verified.loc[RESPONSES[Q1][0], "pass_rate"] == 1.0 and verified.loc[RESPONSES[Q1][2], "pass_rate"] == 0.0
    assert verified.reason.value_counts().to_dict() == {"low_pass_rate": 7}  # code preset: pass rate > 0
    results = json.loads(verified.loc[RESPONSES[Q1][0], "func_results"])
    assert [r["outcome"] for r in results] == ["pass", "pass"] and len({r["func_id"] for r in results}) == 2

    clean = frame("contamination").set_index("response")
    assert clean.loc[CONTAMINATED, "reason"] == "contaminated" and clean.loc[CONTAMINATED, "contaminated_fields"] == "response"
    assert clean.reason.value_counts().to_dict() == {"low_pass_rate": 7, "contaminated": 1}  # failures kept for DPO
    scored = frame("quality_filter").set_index("response")
    assert len(scored) == 8  # only verified, clean responses are scored
    assert scored.reason.value_counts().to_dict() == {"low_score": 1, "missing_score": 1, "score_out_of_range": 1}

    sft = frame("sft")
    assert sorted(sft["response"]) == sorted([RESPONSES[Q1][0], RESPONSES[Q1][1], RESPONSES[Q2][0], RESPONSES[Q2][1],
                                              RESPONSES[Q3][0]])
    row = sft.set_index("response").loc[RESPONSES[Q1][1]]
    assert row["prompt"] == f"{Q1}\n{LOWER}" and row["score"] == 10.0 and row["pass_rate"] == 1.0
    assert len(json.loads(row["func_ids"])) == 2 and row["verifier_source"] == "synthesized"

    dpo = frame("query_dpo")
    kept = dpo[dpo.reason.isna()]
    by_query = kept.groupby("query_id").size().to_dict()
    qid = {r.query: r.query_id for r in pairs.itertuples()}
    assert by_query == {qid[Q1]: 4, qid[Q2]: 2}  # 2 chosen x 2 rejected; 2 chosen x 1 rejected
    q1 = kept[kept.query_id == qid[Q1]]
    assert set(q1.chosen) == {RESPONSES[Q1][0], RESPONSES[Q1][1]} and set(q1.rejected) == {RESPONSES[Q1][2], RESPONSES[Q1][3]}
    assert (q1.chosen_pass_rate == 1.0).all() and (q1.rejected_pass_rate == 0.0).all()
    assert set(kept[kept.query_id == qid[Q2]].chosen) == {RESPONSES[Q2][0], RESPONSES[Q2][1]}  # score 7 is not chosen
    dropped = dpo[dpo.reason.notna()].set_index("query_id")["reason"].to_dict()
    assert dropped == {qid[Q3]: "no_rejected", qid[Q4]: "no_chosen"}  # both sides required
    assert kept.chosen_source.str.len().gt(0).all() and kept.rejected_source.str.len().gt(0).all()

    inst = frame("instruction_dpo")
    ok = inst[inst.reason.isna()]
    assert set(ok.prompt) == {LOWER} and len(ok) == 4
    assert set(ok.chosen) == {"hello world", "all good here"} and set(ok.rejected) == {"Hello World", "HELLO"}

    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    run = client.search_runs([exp.experiment_id], "tags.`autoif.flow` = 'data'")[0]
    m = run.data.metrics
    assert m["sft.rows_out"] == 5 and m["query_dpo.rows_out"] == 6 and m["instruction_dpo.rows_out"] == 4
    assert m["verification.pass_rate.mean"] == pytest.approx(9 / 16)
    assert m["contamination.dropped.contaminated"] == 1

    again = build_data(cfg)
    assert again == refs  # every step reused


def test_reference_verifiers_feed_stage_b(prefect_harness, make_cfg, tmp_path):
    """With seeds.use_reference_verifiers, a selected seed enters stage B with its shipped reference function
    even when stage A kept nothing for it, marked as such in every row."""
    from autoif.tasks.seeds import read_seeds
    from autoif.tasks.self_instruct import SELF_INSTRUCT_PROMPT

    seeds = tmp_path / "seeds.jsonl"
    ref = "def evaluate(response):\n    return response.rstrip().endswith('?')"
    seeds.write_text(json.dumps({"family": "punctuation", "instruction": "End your response with a question mark.",
                                 "func": ref, "cases": [{"input": "Why?", "output": True}, {"input": "No.", "output": False}]}) + "\n")
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"query": Q1}) + "\n")
    instruction = "End your response with a question mark."
    prompt_si = SELF_INSTRUCT_PROMPT.format(seeds=f"- {instruction}")
    from autoif.tasks.verifier_synthesis import verifier_prompt

    cfg = make_cfg({"run_name": "refs", "self_instruct.seeds_path": str(seeds), "self_instruct.n_calls": 1,
                    "verifier_synthesis.n_completions": 1, "seeds.use_reference_verifiers": True, "queries.path": str(queries),
                    "query_augmentation.queries_per_instruction": 1, "response_generation.n_responses": 2})
    records = [{"prompt": prompt_si, "outputs": ["nothing new"]},
               {"prompt": verifier_prompt(instruction, cfg.verifier_synthesis), "outputs": ["no json"]},
               {"prompt": response_prompt(instruction, Q1), "outputs": ["Is it sunny?", "Water it."]},
               {"prompt": score_prompt(instruction, Q1, "Is it sunny?"), "outputs": ['{"analysis": "ok", "score": 9}']}]
    cfg = make_cfg({"run_name": "refs", "self_instruct.seeds_path": str(seeds), "self_instruct.n_calls": 1,
                    "verifier_synthesis.n_completions": 1, "seeds.use_reference_verifiers": True, "queries.path": str(queries),
                    "query_augmentation.queries_per_instruction": 1, "response_generation.n_responses": 2}, script=records)
    assert read_seeds(seeds)["reference_func"].tolist() == [ref]
    refs = build_data(cfg)
    store = Store(cfg.store.root)
    assert store.read_step(refs["consistency_filter"])[0].reason.isna().sum() == 0  # stage A kept nothing
    sft = store.read_step(refs["sft"])[0]
    assert sft["response"].tolist() == ["Is it sunny?"] and sft["verifier_source"].tolist() == ["reference"]
    dpo = store.read_step(refs["query_dpo"])[0]
    assert dpo[["chosen", "rejected", "verifier_source"]].values.tolist() == [["Is it sunny?", "Water it.", "reference"]]
    inst = store.read_step(refs["instruction_dpo"])[0]
    assert inst[["chosen", "rejected"]].values.tolist() == [["Why?", "No."]]
