"""The whole pipeline through step 12 (the default ``until``): stage B's canned data -> SFT -> offline DPO -> one
online iteration on a tiny local Qwen2 -> the base and each trained policy evaluated on an IFEval subset, each
an MLflow run nested under the pipeline's and linked to its model's training run; ``autoif compare --pipeline``
prints them in order; a second run with nothing changed trains and generates nothing."""
from __future__ import annotations

import os

import pytest
from autoif.flows.pipeline import autoif_pipeline
from mlflow import MlflowClient

from autoif.tracking import Tracker
from tests.test_stage_b_flow import stage_b_cfg  # noqa: F401  (fixture)
from tests.test_stage_c_flow import stage_c_cfg  # noqa: F401  (fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HEADLINE = ("ifeval.prompt_level_strict_acc", "ifeval.inst_level_strict_acc", "ifeval.prompt_level_loose_acc",
            "ifeval.inst_level_loose_acc")


def test_pipeline_ends_with_the_evaluation_of_each_policy(prefect_harness, stage_c_cfg, tmp_path, monkeypatch):  # noqa: F811
    from typer.testing import CliRunner

    from autoif.cli import app

    cfg = stage_c_cfg.model_validate({**stage_c_cfg.model_dump(),
                                      "online": {"iterations": 1, "samples_per_prompt": 6, "max_new_tokens": 6,
                                                 "max_prompts": 4, "quality_gate": False, "dpo": {"max_steps": 1}},
                                      "eval": {"pipeline_limit": 3, "pipeline_max_tokens": 8}})
    refs = autoif_pipeline(cfg)  # the default: through the evaluation
    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = Tracker(cfg.tracking).experiment_id
    pipeline = client.search_runs([exp], "tags.`autoif.flow` = 'pipeline'", order_by=["start_time DESC"], max_results=1)[0]
    evals = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{pipeline.info.run_id}' and "
                                      "tags.`autoif.eval.model` LIKE '%'")
    by_label = {r.data.tags["autoif.eval.model"]: r for r in evals}
    trained = ["sft", "dpo"] + (["online-1"] if "online1_train" in refs else [])
    assert sorted(by_label) == sorted(["base", *trained])
    training = {r.data.tags.get("autoif.step") or r.data.params.get("autoif.step"): r.info.run_id
                for r in client.search_runs([exp], "tags.`autoif.training` = 'true'")}
    for label, run in by_label.items():
        assert run.data.metrics["ifeval.n_prompts"] == 3 and all(k in run.data.metrics for k in HEADLINE)
        assert f"ifeval_responses_{label.replace('-', '_')}" in refs
        if label == "base":
            assert "autoif.eval.model_run_id" not in run.data.tags
            continue
        step = {"sft": "train_sft", "dpo": "train_dpo", "online-1": "online1_train"}[label]
        linked = run.data.tags["autoif.eval.model_run_id"]
        assert linked in training.values() and client.get_run(linked).data.tags["mlflow.parentRunId"] == pipeline.info.run_id
        assert run.data.tags["autoif.eval.model_step"] == step

    monkeypatch.chdir(tmp_path)
    args = ["--set", f"store.root={cfg.store.root}", "--set", f"tracking.tracking_uri={cfg.tracking.tracking_uri}"]
    res = CliRunner().invoke(app, ["compare", "--pipeline", cfg.run_name, *args])
    assert res.exit_code == 0, res.output
    header = next(line for line in res.output.splitlines() if "base" in line and "sft" in line)
    assert header.index("base") < header.index("sft") < header.index("dpo")
    assert all(k in res.output for k in HEADLINE)

    # nothing changed: every step from the store, no training run, no generation
    n_training = len(training)
    again = autoif_pipeline(cfg)
    assert {k: v.digest for k, v in again.items()} == {k: v.digest for k, v in refs.items()}
    assert len(client.search_runs([exp], "tags.`autoif.training` = 'true'")) == n_training
    second = client.search_runs([exp], "tags.`autoif.flow` = 'pipeline'", order_by=["start_time DESC"], max_results=1)[0]
    assert second.info.run_id != pipeline.info.run_id and second.data.metrics["llm_requests"] == 0.0
