"""Stage B against a real llama.cpp server with the small embedded model (Gemma 3 270M, base model).

Two seeds with their reference verification functions and test cases enter stage B
(``seeds.use_reference_verifiers``) whatever stage A keeps; each is paired with one real query, the server
writes 2 responses per pair, the sandbox runs every response through the seed's function, the server scores
every verified response (that the contamination check keeps), and the training-data steps run on what is left.
Quality is not asserted (a 270M base model): the run must complete, call the real server for every prompt,
and write valid outputs for every step, with the funnel in MLflow.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from autoif.flows import steps
from autoif.flows.data import build_data
from mlflow import MlflowClient

from autoif.runtime import Step
from autoif.sandbox import Outcome
from autoif.store import Store
from tests.test_real_servers import llamacpp_server  # noqa: F401  the session's llama.cpp server fixture

pytestmark = pytest.mark.slow

STAGE_B = ["stage_b_instructions", "queries", "query_augmentation", "response_generation", "verification",
           "quality_filter", "contamination", "sft", "query_dpo", "instruction_dpo"]
SEEDS = [  # one check a short answer always passes (so the quality filter has rows), one it rarely does
    {"family": "length", "instruction": "Answer with at most 100 words.",
     "func": "def evaluate(response):\n    return len(response.split()) <= 100",
     "cases": [{"input": "A short answer.", "output": True}, {"input": " ".join(["word"] * 150), "output": False}]},
    {"family": "punctuation", "instruction": "Do not use any commas in your response.",
     "func": "def evaluate(response):\n    return ',' not in response",
     "cases": [{"input": "No commas here.", "output": True}, {"input": "One, two.", "output": False}]},
]
QUERIES = ["How do I keep basil alive on a windowsill?", "What is a good way to start learning chess?"]
SCORE_REASONS = {"missing_score", "score_out_of_range", "low_score"}


def schemas() -> dict[str, object]:
    """Every step's output contract, by step name (from the flows' step table)."""
    return {s.spec.name: s.spec.schema for s in vars(steps).values() if isinstance(s, Step) and s.spec.schema is not None}


def test_stage_b_on_the_real_small_model(prefect_harness, make_cfg, llamacpp_server, tmp_path):  # noqa: F811
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(s) + "\n" for s in SEEDS))
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"query": q}) + "\n" for q in QUERIES))
    cfg = make_cfg({
        "run_name": "real-b", "engine.kind": "openai", "engine.base_url": llamacpp_server, "engine.model": "gemma3-270m",
        "engine.max_concurrency": 1,
        # stage A, as small as it goes: one self-instruct call, the seeds plus one new instruction, one completion
        "self_instruct.seeds_path": str(seeds), "self_instruct.n_calls": 1, "self_instruct.max_tokens": 96,
        "self_instruct.max_instructions": 3, "verifier_synthesis.n_completions": 1, "verifier_synthesis.max_tokens": 96,
        "back_translation.max_tokens": 64, "consistency_filter.max_tokens": 64, "consistency_filter.mode": "llm_judge",
        # stage B
        "seeds.use_reference_verifiers": True, "queries.path": str(queries),
        "query_augmentation.queries_per_instruction": 1, "response_generation.n_responses": 2,
        "response_generation.max_tokens": 64, "quality_filter.max_tokens": 64,
        # llama-cpp-python's server returns one choice whatever n is (the engine asks again for the rest), and
        # rejects response_format type json_schema (HTTP 500; it takes json_object + schema): as stage A's test
        "verifier_synthesis.use_json_schema": False, "back_translation.use_json_schema": False,
        "consistency_filter.use_json_schema": False, "quality_filter.use_json_schema": False,
    })
    refs = build_data(cfg)
    store = Store(cfg.store.root)
    contracts = schemas()
    frames: dict[str, pd.DataFrame] = {}
    for name, ref in refs.items():  # every step wrote Parquet that passed its schema (and still does, read back)
        df, _ = store.read_step(ref)
        if name in contracts:  # (a step the flow builds per run, e.g. an export, validated on write only)
            contracts[name].validate(df, lazy=True)
        frames[name] = df
    assert set(STAGE_B) <= set(refs) & set(contracts) and all("reason" in frames[name] for name in STAGE_B)
    step_of = {ref.uri: name for name, ref in refs.items()}

    def manifest(name: str):
        return store.manifest(refs[name].run, refs[name].step, refs[name].key)

    def kept_input(name: str) -> pd.DataFrame:
        """The kept rows of the step feeding ``name`` (the flow decides which one: read from its manifest)."""
        (source,) = [step_of[u] for u in manifest(name).upstream]
        return frames[source][frames[source].reason.isna()]

    inst = frames["stage_b_instructions"]
    ref_rows = inst[inst.verifier_source == "reference"]
    assert sorted(ref_rows.instruction) == sorted(s["instruction"] for s in SEEDS)
    pairs = frames["query_augmentation"]
    assert len(pairs) == len(inst) and set(pairs["query"]) <= set(QUERIES)  # one query per instruction

    # response generation: 2 responses per pair, every one a text the server wrote
    responses = frames["response_generation"]
    assert responses.groupby("pair_id").size().to_dict() == {p: 2 for p in pairs.pair_id}
    assert responses.response.map(lambda t: isinstance(t, str)).all()
    assert responses.reason.isna().all() or set(responses.reason.dropna()) == {"empty_response"}
    assert responses.response.str.len().sum() > 0
    usage = manifest("response_generation").meta["usage"]
    assert usage["llm_completions"] == len(responses) and usage["llm_completion_tokens"] > 0

    # verification: every response with text ran through the sandbox, once per function of its instruction
    written = responses[responses.reason.isna()]
    verified = frames["verification"]
    assert sorted(verified.response_id) == sorted(written.response_id)
    assert verified.pass_rate.between(0, 1).all()
    outcomes = {o.value for o in Outcome}
    for r in verified.itertuples():
        results = json.loads(r.func_results)
        assert len(results) == r.n_funcs == len(json.loads(r.func_ids)) >= 1
        assert all(p["outcome"] in outcomes for p in results)
        assert r.pass_rate == pytest.approx(sum(p["value"] is True for p in results) / len(results))
    assert manifest("verification").meta["sandbox_calls"] == verified.n_funcs.sum()
    short = verified[verified.instruction == SEEDS[0]["instruction"]]
    assert len(short) == 2 and (short.pass_rate == 1.0).all()  # 64 tokens are fewer than 100 words

    # quality filter: the server was asked about every verified response that reaches it (after the
    # contamination check where the flow runs that first); each has a score or says why not
    kept = verified[verified.reason.isna()]
    scored = frames["quality_filter"]
    asked = kept_input("quality_filter")
    assert sorted(scored.response_id) == sorted(asked.response_id) and set(asked.response_id) <= set(kept.response_id)
    assert len(scored) >= 2 and manifest("quality_filter").meta["usage"]["llm_prompts"] == len(scored)
    for r in scored.itertuples():
        assert pd.isna(r.reason) or r.reason in SCORE_REASONS, r  # never an engine error
        assert pd.notna(r.score) or r.reason == "missing_score", r
    assert len(frames["sft"]) == len(kept_input("sft"))

    # the funnel is in MLflow: every stage B step's counts on the flow's run, and the funnel table
    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    run = client.search_runs([exp.experiment_id], "tags.`autoif.flow` = 'data'")[0]
    m = run.data.metrics
    for name in STAGE_B:
        f = manifest(name).meta["funnel"]
        assert (m[f"{name}.rows_in"], m[f"{name}.rows_out"]) == (f["rows_in"], f["rows_out"]), name
    assert m["response_generation.rows_out"] == len(written) and m["verification.rows_in"] == len(written)
    assert m["quality_filter.rows_in"] == len(scored) and m["llm_requests"] > 0
    assert {"funnel.md", "funnel.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    text = Path(client.download_artifacts(run.info.run_id, "funnel.md", str(tmp_path))).read_text()
    assert all(f"| {name} |" in text for name in STAGE_B)
