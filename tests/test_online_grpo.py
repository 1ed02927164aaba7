"""Online GRPO (``online.algorithm: grpo``): TRL's GRPOTrainer with the sandboxed verifiers as its reward
function, on the real flow (Prefect, store, sandbox, MLflow) with the tiny local Qwen2 policy."""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest
from autoif.flows.pipeline import autoif_pipeline
from autoif.tasks.training import adapter_tensors, verifier_reward
from mlflow import MlflowClient

from autoif.config import PipelineStep, VerificationConfig
from autoif.sandbox import shared_sandbox
from autoif.store import Store
from autoif.tracking import Tracker
from tests.test_stage_b_flow import stage_b_cfg  # noqa: F401  (fixture)
from tests.test_stage_c_flow import stage_c_cfg  # noqa: F401  (fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LOWER_FN = "def evaluate(response):\n    return response.islower()\n"
SHORT_FN = "def evaluate(response):\n    return len(response.split()) < 6\n"
LOOPS_ON_X = "def evaluate(response):\n    while 'x' in response:\n        pass\n    return True\n"
RAISES_FN = "def evaluate(response):\n    return 1 / len(response) > 0.01\n"


def _pairs() -> pd.DataFrame:
    def pair(pid: str, funcs: list[str]) -> dict:
        return {"pair_id": pid, "instruction_id": "i-" + pid, "instruction": "Answer in all lowercase letters.",
                "family": None, "funcs": json.dumps(funcs), "func_ids": json.dumps([f"{pid}-f{k}" for k in range(len(funcs))]),
                "verifier_source": "synthesized", "query_id": "q-" + pid, "query": "q?", "prompt": f"prompt {pid}"}

    return pd.DataFrame([pair("lower", [LOWER_FN, SHORT_FN]), pair("hostile", [LOOPS_ON_X, RAISES_FN]),
                         pair("nofuncs", [])])


def test_verifier_reward_is_the_sandboxed_pass_rate():
    """The GRPO reward of a completion is its pass rate over the prompt's instruction's functions, computed in the
    sandbox: a failing function, an exception, a timeout, garbage or an empty completion only lower it."""
    cfg = VerificationConfig(pass_rate={"op": ">", "value": 0.0}, timeout_s=0.5)
    reward = verifier_reward(_pairs(), cfg, shared_sandbox(workers=None, timeout_s=0.5))
    assert reward.__name__ == "verifier_pass_rate"  # TRL logs it as rewards/verifier_pass_rate/mean
    cases = [
        ("lower", "all lowercase here", 1.0),
        ("lower", [{"role": "assistant", "content": "  short lowercase  "}], 1.0),  # conversational, stripped
        ("lower", "Not Lowercase", 0.5),  # one of two functions passes
        ("lower", "This Is Far Too Long For The Limit Here", 0.0),
        ("lower", "", 0.5),  # empty: not lowercase, but short
        ("lower", "\x00\udcff]]}{ GARBAGE \u202e ~~ ;; ** %% && \ufffd", 0.0),
        ("lower", "__import__('os').system('rm -rf /') OR 1=1; DROP TABLE x", 0.0),
        ("hostile", "x marks the loop", 0.5),  # the loop times out (a fail); the other function passes
        ("hostile", "", 0.5),  # no 'x': the loop function passes; 1 / 0 raises (a fail)
        ("nofuncs", "anything", 0.0),
    ]
    got = reward(prompts=[[{"role": "user", "content": "p"}]] * len(cases), completions=[c for _, c, _ in cases],
                 pair_id=[p for p, _, _ in cases], completion_ids=[[0]] * len(cases), trainer_state=None)
    assert len(got) == len(cases) and all(isinstance(g, float) for g in got)
    assert got == [e for _, _, e in cases], list(zip([c for _, c, _ in cases], got))


@pytest.mark.slow
def test_online_grpo_iteration_from_the_dpo_model(prefect_harness, stage_c_cfg):  # noqa: F811
    """One GRPO iteration on the tiny policy: TRL samples K completions per prompt from the DPO model, the
    sandboxed verifiers reward them, the adapter keeps training; TRL's reward metric is on the training run and
    the iteration's values are ``grpo.*`` metric histories on the pipeline run."""
    cfg = stage_c_cfg.model_validate({**stage_c_cfg.model_dump(), "online": {
        "algorithm": "grpo", "iterations": 1, "samples_per_prompt": 4, "max_new_tokens": 8, "max_prompts": 2,
        "grpo": {"max_steps": 2, "learning_rate": 1e-2, "gradient_checkpointing": False}}})
    refs = autoif_pipeline(cfg, until=PipelineStep.online)
    assert "grpo1_train" in refs and not any(k.startswith("online1_") for k in refs)  # no DPO-path steps
    store = Store.from_config(cfg.store)
    row, _ = store.read_step(refs["grpo1_train"])
    r = row.iloc[0]
    assert (r["model_id"], r["method"], r["iteration"], r["parent"]) == ("grpo-1", "grpo", 1, "dpo")
    assert (r["train_rows"], r["steps"]) == (2, 2)  # max_prompts prompts, max_steps steps
    assert r["reward_margin"] is None or r["reward_margin"] != r["reward_margin"]  # no pairs: no margin
    history = json.loads(r["log_history"])
    rewards = [h["reward"] for h in history if "reward" in h]
    assert rewards and all(0.0 <= x <= 1.0 for x in rewards)

    dpo, _ = store.read_step(refs["train_dpo"])
    a, b = adapter_tensors(dpo["weights"].iloc[0]), adapter_tensors(r["weights"])
    assert set(a) == set(b)  # the same adapter (no TRL "ref" copy saved), trained further
    assert any(float((a[k] - b[k]).abs().sum()) > 0 for k in a)

    client = MlflowClient(cfg.tracking.tracking_uri)
    tracker = Tracker(cfg.tracking)
    training = client.search_runs([tracker.experiment_id], "tags.`autoif.training` = 'true'")
    grpo_run = [t for t in training if t.data.params.get("autoif.model_id") == "grpo-1"]
    assert len(grpo_run) == 1
    metrics = grpo_run[0].data.metrics
    assert "reward" in metrics and "rewards/verifier_pass_rate/mean" in metrics  # TRL's MLflow callback
    pipeline = client.search_runs([tracker.experiment_id], "tags.`autoif.flow` = 'pipeline'",
                                  order_by=["start_time DESC"], max_results=1)[0]
    reward_curve = client.get_metric_history(pipeline.info.run_id, "grpo.reward")
    assert [m.step for m in reward_curve] == [1]
    assert reward_curve[0].value == pytest.approx(sum(rewards) / len(rewards))
    assert client.get_metric_history(pipeline.info.run_id, "grpo.pass_rate")[0].value == reward_curve[0].value
    assert [m.step for m in client.get_metric_history(pipeline.info.run_id, "grpo.train_loss")] == [1]
    print("grpo rewards per step:", rewards)
