"""The pipeline's evaluation of the policy (step 12): the base and a trained model (a hand-made TrainedModels row
holding a perturbed LoRA adapter of a tiny local Qwen2) answer an IFEval subset through autoif.policy.policy_llm;
each evaluation is an MLflow run nested under the pipeline's run and linked to the model's training run;
``autoif compare --pipeline`` prints them side by side; a second run generates nothing."""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from autoif.flows.evaluate import evaluate_policy  # noqa: E402
from autoif.flows.steps import EvaluationSteps  # noqa: E402
from autoif.schemas.training import TrainedModels  # noqa: E402
from autoif.tasks.evaluate import EvalSpec  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from prefect import flow  # noqa: E402

from autoif.evaluation import data as evdata  # noqa: E402
from autoif.evaluation.data import Benchmark  # noqa: E402
from autoif.policy import base_identity, clear_policy_cache, pack_weights, policy_llm, weights_digest  # noqa: E402
from autoif.runtime.execute import as_ref  # noqa: E402
from autoif.runtime.recording import pipeline_run  # noqa: E402
from autoif.store import StepRef, Store  # noqa: E402
from tests.tiny_models import build_tiny_qwen2  # noqa: E402
from tests.vllm_lora import perturbed_lora_adapter  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LIMIT = 3
MAX_TOKENS = 12
HEADLINE = ("ifeval.prompt_level_strict_acc", "ifeval.inst_level_strict_acc", "ifeval.prompt_level_loose_acc",
            "ifeval.inst_level_loose_acc")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_policy")
    model = build_tiny_qwen2(root / "tiny-qwen2")
    adapter = pack_weights(perturbed_lora_adapter(model, root / "adapter", seed=3))
    yield {"root": root, "model": model, "adapter": adapter}
    clear_policy_cache()


def _cfg(make_cfg, tiny, run_name: str):
    return make_cfg({"run_name": run_name, "setting": "strong_to_weak", "policy.model": "tiny-qwen2", "policy.model_path": str(tiny["model"]),
                     "policy.device": "cpu", "policy.adapter_root": str(tiny["root"] / "adapters"),
                     "eval.pipeline_limit": LIMIT, "eval.pipeline_max_tokens": MAX_TOKENS})


def _models(cfg, weights: bytes | None, model_id: str = "sft") -> pd.DataFrame:
    """One TrainedModels row as a training step writes it; no weights: a dropped row (nothing trained)."""
    frame = pd.DataFrame([{
        "model_id": model_id, "method": "sft", "iteration": 0, "base_model": cfg.policy.model,
        "base_identity": base_identity(cfg.policy), "parent": "base", "is_adapter": True, "train_rows": 4, "steps": 2,
        "train_loss": 1.5, "reward_margin": None, "seconds": 0.1, "log_history": json.dumps([{"loss": 1.5}]),
        "weights": weights, "weights_digest": weights_digest(weights) if weights else None,
        "reason": None if weights else "no_training_rows"}])
    return TrainedModels.validate(frame)


def _stored(cfg, frame: pd.DataFrame, step: str) -> StepRef:
    m = Store.from_config(cfg.store).write_step(frame, cfg.run_name, step, f"handmade-{step}", schema=TrainedModels,
                                                meta={"funnel": {"step": step, "rows_in": 1, "rows_out": int(frame["reason"].isna().sum()),
                                                                 "reasons": {}}})
    return as_ref(m)


def _training_run(cfg) -> str:
    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
    run = client.create_run(exp_id, run_name="train_sft", tags={"autoif.training": "true"})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@flow(name="test-pipeline-evaluations")
def _pipeline(cfg, model: StepRef, dropped: StepRef, training_run: str) -> dict:
    with pipeline_run(cfg, "pipeline") as run:
        run.training_runs[model.step] = training_run  # as the pipeline's training step records it
        return {"pipeline_run": run.parent_run_id,
                "base": evaluate_policy(run, None, "base"),
                "sft": evaluate_policy(run, model, "sft"),
                "skipped": evaluate_policy(run, dropped, "dpo")}


def test_base_and_trained_policy_evaluated_linked_and_compared(prefect_harness, make_cfg, tiny, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from autoif.cli import app

    monkeypatch.chdir(tmp_path)  # the CLI writes its log under ./.autoif/logs
    cfg = _cfg(make_cfg, tiny, "evp")
    model = _stored(cfg, _models(cfg, tiny["adapter"]), "train_sft")
    dropped = _stored(cfg, _models(cfg, None, "dpo"), "train_dpo")
    training_run = _training_run(cfg)

    out = _pipeline(cfg, model, dropped, training_run)
    base, sft = out["base"], out["sft"]
    assert out["skipped"] is None  # a training step that kept no model: nothing to evaluate

    # the answers: the base's and the adapter's differ; the adapter's are exactly policy_llm's with the weights
    store = Store.from_config(cfg.store)
    base_answers = store.read_step(base["refs"]["ifeval_responses_base"])[0]
    sft_answers = store.read_step(sft["refs"]["ifeval_responses_sft"])[0]
    prompts = evdata.load_prompts("ifeval").head(LIMIT)["prompt"].tolist()
    assert base_answers["prompt"].tolist() == sft_answers["prompt"].tolist() == prompts
    assert set(base_answers["model"]) == {"base"} and set(sft_answers["model"]) == {"sft"}
    assert base_answers["response"].tolist() != sft_answers["response"].tolist()
    direct = policy_llm(cfg.policy, tiny["adapter"]).generate(prompts, temperature=0.0, max_tokens=MAX_TOKENS)
    assert sft_answers["response"].tolist() == [d[0] for d in direct]
    assert base["refs"]["ifeval_prompts"] == sft["refs"]["ifeval_prompts"]  # one benchmark subset, stored once

    # MLflow: two evaluation runs nested under the pipeline's run, labelled, the trained one linked to its run
    client = MlflowClient(cfg.tracking.tracking_uri)
    runs = {label: client.get_run(res["mlflow_run_id"]) for label, res in (("base", base), ("sft", sft))}
    for label, run in runs.items():
        assert run.data.tags["mlflow.parentRunId"] == out["pipeline_run"]
        assert run.data.tags["autoif.eval.model"] == label and run.data.tags["autoif.eval.benchmarks"] == "ifeval"
        res = base if label == "base" else sft
        assert res["by_benchmark"]["ifeval"]["n_prompts"] == LIMIT
        for k in HEADLINE:
            assert run.data.metrics[k] == pytest.approx(res["metrics"][k])
        assert run.data.metrics["llm_requests"] > 0  # the policy generated
    assert "autoif.eval.model_run_id" not in runs["base"].data.tags
    assert runs["sft"].data.tags["autoif.eval.model_run_id"] == training_run == sft["model_run_id"]
    assert runs["sft"].data.tags["autoif.eval.weights_digest"] == weights_digest(tiny["adapter"])
    assert client.get_run(training_run).data.tags["autoif.eval.ifeval.run_id"] == runs["sft"].info.run_id
    assert client.get_run(out["pipeline_run"]).data.metrics["llm_requests"] > 0  # the evaluations' usage counts there

    # the trained model's weights are in the answers' key: other weights, another version of the step
    steps = EvaluationSteps(EvalSpec(Benchmark.ifeval, limit=LIMIT, policy_label="sft"))
    p = base["refs"]["ifeval_prompts"]
    assert steps.responses.key(cfg, {"prompts": p, "model": model}) == sft["refs"]["ifeval_responses_sft"].key
    assert steps.responses.key(cfg, {"prompts": p, "model": model.model_copy(update={"digest": "0" * 64})}) != \
        sft["refs"]["ifeval_responses_sft"].key

    # `autoif compare --pipeline`: base and sft side by side with the four IFEval metrics
    runner = CliRunner()
    args = ["--set", f"store.root={cfg.store.root}", "--set", f"tracking.tracking_uri={cfg.tracking.tracking_uri}"]
    res = runner.invoke(app, ["compare", "--pipeline", "evp", *args])
    assert res.exit_code == 0, res.output
    for k in HEADLINE:
        assert k in res.output
    header = next(line for line in res.output.splitlines() if "base" in line and "sft" in line)
    assert header.index("base") < header.index("sft")
    row = next(line for line in res.output.splitlines() if "ifeval.inst_level_loose_acc" in line)
    assert f"{base['metrics']['ifeval.inst_level_loose_acc']:.4f}" in row
    assert f"{sft['metrics']['ifeval.inst_level_loose_acc']:.4f}" in row
    assert out["pipeline_run"][:8] in res.output

    # a second run with nothing changed: every evaluation step from the cache, no generation
    again = _pipeline(cfg, model, dropped, training_run)
    assert again["sft"]["refs"] == sft["refs"] and again["base"]["refs"] == base["refs"]
    assert again["sft"]["metrics"] == sft["metrics"]
    for res_again in (again["base"], again["sft"]):
        assert client.get_run(res_again["mlflow_run_id"]).data.metrics["llm_requests"] == 0.0
    assert client.get_run(again["pipeline_run"]).data.metrics["llm_requests"] == 0.0
    latest = runner.invoke(app, ["compare", *args])  # no RUN: the latest pipeline run with evaluations
    assert latest.exit_code == 0, latest.output
    assert again["pipeline_run"][:8] in latest.output and all(k in latest.output for k in HEADLINE)

    missing = runner.invoke(app, ["compare", "--pipeline", "nosuchrun", *args])
    assert missing.exit_code == 1 and "no pipeline run" in missing.output
