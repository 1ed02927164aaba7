"""The evaluation flow end to end: Prefect flow run, versioned Parquet, MLflow run linked to the model run."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from autoif.flows.evaluate import evaluate
from mlflow import MlflowClient

from autoif.evaluation import data as evdata
from autoif.evaluation import followbench as fb
from autoif.evaluation import verifiable
from tests.test_eval_scoring import FOLLOWBENCH_FIXTURE, varied_response

LIMIT = 25


def _model_run(cfg) -> str:
    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
    run = client.create_run(exp_id, run_name="sft-policy")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _artifact_text(client, run_id: str, path: str, tmp_path: Path) -> str:
    local = client.download_artifacts(run_id, path, str(tmp_path))
    return Path(local).read_text()


def test_ifeval_flow_with_engine(prefect_harness, make_cfg, tmp_path):
    prompts = evdata.load_prompts("ifeval").head(LIMIT)
    canned = {p: varied_response(p, i) for i, p in enumerate(prompts["prompt"])}
    cfg = make_cfg({"run_name": "ev"}, script=[{"prompt": p, "outputs": [r]} for p, r in canned.items()])
    model_run = _model_run(cfg)

    out = evaluate(cfg, benchmark="ifeval", model_run_id=model_run, limit=LIMIT)

    # the scores in the store are the reference scoring of exactly the engine's responses
    scores = pd.read_parquet(out["scores"].uri)
    expected = verifiable.score_instructions(prompts, pd.DataFrame({"prompt": list(canned), "response": list(canned.values())}), "ifeval")
    assert len(scores) == len(expected) == prompts["instruction_id_list"].map(len).sum()
    assert scores["strict"].tolist() == expected["strict"].tolist()
    want = verifiable.metrics(expected)
    assert out["metrics"]["prompt_level_loose_acc"] == pytest.approx(want["prompt_level_loose_acc"])

    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(out["mlflow_run_id"])
    assert run.data.tags["autoif.eval.model_run_id"] == model_run
    assert run.data.tags["autoif.eval.benchmark"] == "ifeval" and run.data.tags["autoif.eval.model"].startswith("scripted:")
    for k in ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc"):
        assert run.data.metrics[f"ifeval.{k}"] == pytest.approx(want[k])
    assert client.get_run(model_run).data.tags["autoif.eval.ifeval.run_id"] == run.info.run_id
    per_type = pd.read_csv(pd.io.common.StringIO(_artifact_text(client, run.info.run_id, "ifeval/per_type.csv", tmp_path)))
    assert per_type["n"].sum() == len(expected)
    lines = _artifact_text(client, run.info.run_id, "ifeval/responses.jsonl", tmp_path).splitlines()
    assert [json.loads(x)["response"] for x in lines] == list(canned.values())

    # identical second run: every step from the cache, no LLM call, same versions
    again = evaluate(cfg, benchmark="ifeval", model_run_id=model_run, limit=LIMIT)
    assert again["scores"] == out["scores"]
    assert client.get_run(again["mlflow_run_id"]).data.metrics["llm_requests"] == 0.0


def test_ifbench_flow_from_responses_file_and_cli_compare(prefect_harness, make_cfg, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.chdir(tmp_path)  # the CLI writes its log under ./.autoif/logs
    from autoif.cli import app

    sample = evdata.default_prompts_path("ifbench").parent / "sample_output.jsonl"
    cfg = make_cfg({"run_name": "evfile"}, script=[])
    out = evaluate(cfg, benchmark="ifbench", responses_path=str(sample))
    direct = verifiable.metrics(verifiable.score_instructions(evdata.load_prompts("ifbench"), evdata.load_responses(sample), "ifbench"))
    for k in ("prompt_level_strict_acc", "inst_level_loose_acc", "n_unscored_prompts"):
        assert out["metrics"][k] == pytest.approx(direct[k])
    assert out["responses"].rows == 294

    # a second file with half the answers emptied: worse scores, and `compare` shows both side by side
    rows = [json.loads(x) for x in sample.read_text().splitlines()]
    worse = tmp_path / "worse.jsonl"
    worse.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"] if i % 2 else ""}) + "\n"
                             for i, r in enumerate(rows)))
    runner = CliRunner()
    args = ["--set", f"store.root={cfg.store.root}", "--set", f"tracking.tracking_uri={cfg.tracking.tracking_uri}",
            "--set", "run_name=evfile"]
    res = runner.invoke(app, ["eval", "--benchmark", "ifbench", "--responses", str(worse), *args])
    assert res.exit_code == 0, res.output
    assert "prompt_level_strict_acc" in res.output
    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`autoif.eval.benchmark` = 'ifbench'", order_by=["start_time ASC"])
    assert len(runs) == 2
    assert runs[1].data.metrics["ifbench.prompt_level_strict_acc"] < runs[0].data.metrics["ifbench.prompt_level_strict_acc"]
    res = runner.invoke(app, ["compare", runs[0].info.run_id, runs[1].info.run_id, *args])
    assert res.exit_code == 0, res.output
    assert "ifbench.prompt_level_strict_acc" in res.output
    assert f"{runs[0].data.metrics['ifbench.prompt_level_strict_acc']:.4f}" in res.output
    assert f"{runs[1].data.metrics['ifbench.prompt_level_strict_acc']:.4f}" in res.output


def test_followbench_flow_with_judge(prefect_harness, make_cfg):
    data = fb.load_followbench(FOLLOWBENCH_FIXTURE)
    answers = {r.instruction: f"answer {r.category} {r.example_id} {r.level}" for r in data[data.level >= 1].itertuples()}
    script = [{"prompt": p, "outputs": [a]} for p, a in answers.items()]
    for (cat, ex), g in data.groupby(["category", "example_id"]):
        g = g.sort_values("level")
        for r in g[g.level >= 1].itertuples():
            if fb.is_rule_checkable(r.category, r.source, r.example_id):
                continue
            prompt = fb.judge_prompt(cat, g["instruction"].tolist()[: r.level + 1], answers[r.instruction])
            verdict = "['YES']" if r.level == 1 else str(["YES"] * r.level)
            script.append({"prompt": prompt, "outputs": [f"Fine.\n{verdict}"]})
    cfg = make_cfg({"run_name": "evfb", "eval.followbench_path": str(FOLLOWBENCH_FIXTURE)}, script=script)
    out = evaluate(cfg, benchmark="followbench")
    m = out["metrics"]
    assert m["n_judge_rows"] == 5 and m["n_rule_rows"] == 10
    # judged rows all satisfied, rule rows (fixed answers match no template or rule) all failed
    assert m["hsr_level_1"] == pytest.approx(1 / 3) and m["ssr_level_5"] == pytest.approx(1 / 3)
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(out["mlflow_run_id"])
    assert run.data.metrics["followbench.csl"] == pytest.approx(5 / 3)


def test_generation_failures_are_kept_as_dropped_rows():
    from autoif.tasks.evaluate import answer_batch

    from autoif.config import EvalConfig
    from autoif.llm import LLMContextOverflowError

    class Engine:  # rejects one prompt, as a server rejects a prompt longer than its context
        def generate(self, prompts, n=1, temperature=0.0, max_tokens=512, seed=None, json_schema=None):
            for i, p in enumerate(prompts):
                if "too long" in p:
                    raise LLMContextOverflowError("prompt exceeds the context window", prompt_index=i)
            return [[p.upper()] for p in prompts]

    prompts = pd.DataFrame({"item_id": ["1", "2", "3"], "prompt": ["a", "too long", "c"], "to_answer": True})
    out = answer_batch(prompts, Engine(), EvalConfig(), seed=0)
    assert out["response"].tolist() == ["A", "", "C"]
    assert out["reason"].isna().tolist() == [True, False, True] and out["reason"].iloc[1] == "prompt_too_long"
    assert "context window" in out["error"].iloc[1]
