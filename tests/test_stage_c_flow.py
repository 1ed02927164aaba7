"""Stage C on the real flow: stage B's canned data (scripted engine) -> SFT -> offline DPO from the SFT adapter,
training a tiny local Qwen2 with TRL + peft; MLflow lineage from the registered version back to the pipeline."""
from __future__ import annotations

import json
import os

import pytest
from autoif.flows.pipeline import autoif_pipeline
from autoif.tasks.training import adapter_tensors
from mlflow import MlflowClient

from autoif.config import PipelineStep
from autoif.runtime.lineage import walk_back
from autoif.store import Store
from autoif.tracking import Tracker
from tests.test_stage_b_flow import stage_b_cfg  # noqa: F401  (fixture)
from tests.tiny_models import build_tiny_qwen2

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def stage_c_cfg(stage_b_cfg, tmp_path_factory):  # noqa: F811
    model = build_tiny_qwen2(tmp_path_factory.mktemp("tiny") / "qwen2")
    small = {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 128, "learning_rate": 1e-2}
    return stage_b_cfg.model_validate({**stage_b_cfg.model_dump(), "setting": "strong_to_weak",
                                       "policy": {"model": "tiny-qwen2", "model_path": str(model), "device": "cpu"},
                                       "train": {"sft": small, "dpo": small, "register_model": "autoif-test"}})


def test_sft_then_dpo_trains_and_links_lineage(prefect_harness, stage_c_cfg):
    cfg = stage_c_cfg
    refs = autoif_pipeline(cfg, until=PipelineStep.train_dpo)
    store = Store.from_config(cfg.store)
    sft, _ = store.read_step(refs["train_sft"])
    dpo, _ = store.read_step(refs["train_dpo"])
    assert list(sft["model_id"]) == ["sft"] and list(dpo["model_id"]) == ["dpo"] and dpo["parent"].iloc[0] == "sft"
    a, b = adapter_tensors(sft["weights"].iloc[0]), adapter_tensors(dpo["weights"].iloc[0])
    lora_b = [k for k in a if "lora_B" in k]
    assert lora_b and all(float(a[k].abs().sum()) > 0 for k in lora_b)  # LoRA B starts at zero: SFT moved it
    assert any(float((a[k] - b[k]).abs().sum()) > 0 for k in a)  # DPO kept training the SFT adapter
    assert sft["steps"].iloc[0] == 2 and dpo["reward_margin"].notna().all()

    tracker = Tracker(cfg.tracking)
    client = MlflowClient(cfg.tracking.tracking_uri)
    export = store.manifest(refs["export_trl_sft"].run, "export_trl_sft", refs["export_trl_sft"].key)
    chain = walk_back(tracker, "autoif-test", "1")  # the first registered version: the SFT model
    assert chain["logged_model_source_run"] == chain["training_run"]
    assert {"name": "export_trl_sft", "digest": export.digest[:32], "source": export.uri} in chain["datasets"]
    pipeline_run = client.get_run(chain["pipeline_run"])
    assert pipeline_run.data.tags["autoif.flow"] == "pipeline"
    training = client.get_run(chain["training_run"])
    assert "train_loss" in training.data.metrics  # TRL's own MLflow callback logged into our run
    assert training.data.params["autoif.model_id"] == "sft" and training.info.status == "FINISHED"
    artifacts = {f.path for f in client.list_logged_model_artifacts(chain["model_id"])}
    assert "adapter_config.json" in artifacts and any(p.endswith(".safetensors") for p in artifacts)
    logged = client.get_logged_model(chain["model_id"])
    assert logged.params["base_model"] == "tiny-qwen2"
    versions = client.search_model_versions("name = 'autoif-test'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    dpo_chain = walk_back(tracker, "autoif-test", "2")
    dpo_export = store.manifest(refs["export_trl_dpo"].run, "export_trl_dpo", refs["export_trl_dpo"].key)
    assert [d["digest"] for d in dpo_chain["datasets"]] == [dpo_export.digest[:32]]  # the init model is no dataset
    history = json.loads(dpo["log_history"].iloc[0])
    assert abs(history[0]["rewards/margins"]) < 1e-3  # the reference is the SFT policy: no margin at step 1

    # a second run of the same config trains nothing: both steps from the store, no new training run
    n_training = len(client.search_runs([tracker.experiment_id], "tags.`autoif.training` = 'true'"))
    again = autoif_pipeline(cfg, until=PipelineStep.train_dpo)
    assert again["train_dpo"].digest == refs["train_dpo"].digest
    assert len(client.search_runs([tracker.experiment_id], "tags.`autoif.training` = 'true'")) == n_training
    assert len(client.search_model_versions("name = 'autoif-test'")) == 2


def test_unknown_trl_field_is_named_before_training(stage_c_cfg):
    from autoif.config import ConfigError

    cfg = stage_c_cfg.model_validate({**stage_c_cfg.model_dump(), "train": {"sft": {"learning_rat": 1e-4}}})
    with pytest.raises(ConfigError, match="train.sft: unknown SFTConfig field.*'learning_rat'"):
        cfg.train.check()


def test_online_iterations_from_the_dpo_model(prefect_harness, stage_c_cfg):
    """Two online iterations on the tiny policy (gate off: no LLM call): each samples from the previous model,
    verifies in the sandbox, pairs and trains; per-iteration values are metric histories on the pipeline run."""
    cfg = stage_c_cfg.model_validate({**stage_c_cfg.model_dump(), "online": {
        "iterations": 2, "samples_per_prompt": 6, "max_new_tokens": 6, "max_prompts": 4, "quality_gate": False,
        "dpo": {"max_steps": 1}}})
    refs = autoif_pipeline(cfg, until=PipelineStep.online)
    store = Store.from_config(cfg.store)
    for i in (1, 2):
        samples, _ = store.read_step(refs[f"online{i}_samples"])
        assert len(samples) == 4 * 6 and samples["response_index"].max() == 5
        verified, _ = store.read_step(refs[f"online{i}_verification"])
        assert verified["pass_rate"].between(0, 1).all()
    client = MlflowClient(cfg.tracking.tracking_uri)
    runs = client.search_runs([Tracker(cfg.tracking).experiment_id], "tags.`autoif.flow` = 'pipeline'",
                              order_by=["start_time DESC"], max_results=1)
    history = client.get_metric_history(runs[0].info.run_id, "online.pass_rate")
    assert sorted(m.step for m in history) == [1, 2]
    pairs = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "online.pairs")}
    gate = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "online.gate_rejected")}
    assert gate == {1: 0.0, 2: 0.0}  # gate off: nothing rejected, no quality step (no LLM request)
    assert all(f"online{i}_ungated" in refs and f"online{i}_quality" not in refs for i in (1, 2))
    trained = [i for i in (1, 2) if pairs[i] > 0]
    for i in trained:
        row, _ = store.read_step(refs[f"online{i}_train"])
        assert row["model_id"].iloc[0] == f"online-{i}" and row["iteration"].iloc[0] == i
    if trained:  # the iteration's adapter differs from the DPO model it started from
        dpo, _ = store.read_step(refs["train_dpo"])
        last, _ = store.read_step(refs[f"online{trained[-1]}_train"])
        a, b = adapter_tensors(dpo["weights"].iloc[0]), adapter_tensors(last["weights"].iloc[0])
        assert any(float((a[k] - b[k]).abs().sum()) > 0 for k in a)
    print("online pairs per iteration:", pairs)


def test_quality_gate_rejects_verifier_passing_samples_scored_low(prefect_harness, stage_c_cfg, tmp_path):
    """Against reward hacking: a sample that passes the verifiers but the judge scores low is not chosen, and
    the count of such samples is the iteration's gate_rejected."""
    from autoif.tasks.quality_filter import score_prompt

    from tests.conftest import write_script

    online = {"iterations": 1, "samples_per_prompt": 6, "max_new_tokens": 6, "max_prompts": 4, "dpo": {"max_steps": 1}}
    ungated = stage_c_cfg.model_validate({**stage_c_cfg.model_dump(), "online": {**online, "quality_gate": False}})
    refs = autoif_pipeline(ungated, until=PipelineStep.online)
    store = Store.from_config(ungated.store)
    verified, _ = store.read_step(refs["online1_verification"])
    passing = verified[verified["reason"].isna()]
    assert len(passing) >= 2
    low = set(passing["response_id"].iloc[::2])  # every other verifier-passing sample is judged poor
    script = [json.loads(line) for line in open(stage_c_cfg.engine.scripted_path)]
    script += [{"prompt": score_prompt(r.instruction, r.query, r.response),
                "outputs": ['{"analysis": "poor", "score": 2}' if r.response_id in low else '{"analysis": "good", "score": 9}']}
               for r in passing.itertuples()]
    write_script(tmp_path / "gated.jsonl", script)
    gated = stage_c_cfg.model_validate({**stage_c_cfg.model_dump(), "online": online,
                                        "engine": {**stage_c_cfg.engine.model_dump(), "scripted_path": str(tmp_path / "gated.jsonl")}})
    refs = autoif_pipeline(gated, until=PipelineStep.online)
    scored, _ = store.read_step(refs["online1_quality"])
    texts_low = set(passing[passing["response_id"].isin(low)]["response"])
    texts_high = set(passing[~passing["response_id"].isin(low)]["response"])
    assert set(scored[scored["reason"] == "low_score"]["response_id"]) == low
    pairs, _ = store.read_step(refs["online1_pairs"])
    kept = pairs[pairs["reason"].isna()]
    assert not (set(kept["chosen"]) & (texts_low - texts_high))  # a low-scored sample is never chosen
    client = MlflowClient(gated.tracking.tracking_uri)
    runs = client.search_runs([Tracker(gated.tracking).experiment_id], "tags.`autoif.flow` = 'pipeline'",
                              order_by=["start_time DESC"], max_results=1)
    gate = client.get_metric_history(runs[0].info.run_id, "online.gate_rejected")
    assert [m.value for m in gate] == [float(len(low))]
