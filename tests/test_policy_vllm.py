"""The policy on a real vLLM CPU server: trained adapters loaded at runtime and sampled by name.

One server (infra/vllm_server.sh, port 8093, ``--enable-lora --max-lora-rank 8``, runtime LoRA updating on)
serves the tiny Qwen2 dir the script builds; adapters are made here on that same dir (random non-zero LoRA B),
packed as the pipeline packs them, and loaded through ``policy_llm(engine=vllm)``. Slow: the first run on a
machine creates the vLLM venv (about 2-3 minutes); a start is about 30 s afterwards.
"""
from __future__ import annotations

import httpx
import pytest

from autoif.config import PolicyConfig
from autoif.llm import LLMSetupError
from autoif.llm.openai_http import adapter_rank, load_lora_adapter
from autoif.policy import pack_weights, policy_llm, weights_digest
from tests.vllm_lora import DEFAULT_PORT, MAX_LORA_RANK, VLLMLoRAServer, perturbed_lora_adapter, tiny_vllm_model_dir

pytestmark = pytest.mark.slow

PROMPTS = ["Write a short story about a robot.", "Answer in lowercase letters only.", "Explain why the sky is blue."]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = tiny_vllm_model_dir()
    root = tmp_path_factory.mktemp("policy_vllm")
    server = VLLMLoRAServer(port=DEFAULT_PORT, model_dir=model_dir, run_dir=root / "run")
    try:
        url = server.start()
        print(f"\n[vLLM] healthy after {server.startup_s:.1f} s (script start, venv already there)")
        yield {"url": url, "model_dir": model_dir, "root": root, "server": server}
    finally:
        server.stop()
    assert not server.healthy()


def _policy(served) -> PolicyConfig:
    return PolicyConfig(model="tiny-qwen2", engine="vllm", base_url=served["url"],
                        adapter_root=str(served["root"] / "adapters"), timeout_s=120)


def _models(url: str) -> dict[str, str | None]:
    data = httpx.get(url.rstrip("/") + "/models", timeout=30).json()["data"]
    return {m["id"]: m.get("root") for m in data}


def test_adapters_load_by_name_and_change_greedy_output(served):
    policy = _policy(served)
    base = policy_llm(policy)
    assert base.model == "tiny-qwen2"
    base_out = base.generate(PROMPTS, temperature=0.0, max_tokens=16)

    one = pack_weights(perturbed_lora_adapter(served["model_dir"], served["root"] / "a1", seed=1))
    llm1 = policy_llm(policy, one)
    assert llm1.model == "autoif-" + weights_digest(one)
    out1 = llm1.generate(PROMPTS, temperature=0.0, max_tokens=16)
    assert out1 != base_out
    assert out1 == llm1.generate(PROMPTS, temperature=0.0, max_tokens=16)

    # loading the same weights again (a retried task, another process) is fine and serves the same adapter
    again = policy_llm(policy, one)
    assert again.model == llm1.model
    assert again.generate(PROMPTS, temperature=0.0, max_tokens=16) == out1

    sampled = llm1.generate(PROMPTS[:1], n=3, temperature=1.0, max_tokens=12, seed=4)
    assert len(sampled[0]) == 3 and sampled == llm1.generate(PROMPTS[:1], n=3, temperature=1.0, max_tokens=12, seed=4)

    two = pack_weights(perturbed_lora_adapter(served["model_dir"], served["root"] / "a2", seed=2))
    llm2 = policy_llm(policy, two, name="second")
    assert llm2.model == "second"
    out2 = llm2.generate(PROMPTS, temperature=0.0, max_tokens=16)
    assert out2 != base_out and out2 != out1
    # both stay served: the first adapter answers as before
    assert llm1.generate(PROMPTS, temperature=0.0, max_tokens=16) == out1
    models = _models(served["url"])
    assert {"tiny-qwen2", llm1.model, "second"} <= set(models)
    assert models["second"].endswith(weights_digest(two))
    assert llm2.usage.completions == len(PROMPTS) and llm2.usage.completion_tokens > 0


def test_a_name_taken_by_other_weights_is_a_setup_error(served):
    policy = _policy(served)
    three = pack_weights(perturbed_lora_adapter(served["model_dir"], served["root"] / "a3", seed=3))
    policy_llm(policy, three, name="taken")
    four = pack_weights(perturbed_lora_adapter(served["model_dir"], served["root"] / "a4", seed=4))
    with pytest.raises(LLMSetupError, match="already loaded from"):
        policy_llm(policy, four, name="taken")


def test_an_adapter_above_the_servers_max_rank_is_refused_before_the_request(served):
    big = perturbed_lora_adapter(served["model_dir"], served["root"] / "r16", seed=5, r=16)
    assert adapter_rank(big) == 16
    with pytest.raises(LLMSetupError, match="max LoRA rank 8"):
        load_lora_adapter(served["url"], "too-big", big, max_rank=MAX_LORA_RANK)
    assert served["server"].healthy() and "too-big" not in _models(served["url"])


def test_transformers_and_vllm_engines_agree_on_greedy_text(served):
    """Same prompt tokens (chat template, no extra special tokens) and same weights: the same greedy text."""
    weights = pack_weights(perturbed_lora_adapter(served["model_dir"], served["root"] / "agree", seed=7))
    local = PolicyConfig(model="tiny-qwen2", model_path=str(served["model_dir"]), device="cpu",
                         adapter_root=str(served["root"] / "adapters"))
    in_process = policy_llm(local, weights).generate(PROMPTS, temperature=0.0, max_tokens=12)
    served_out = policy_llm(_policy(served), weights).generate(PROMPTS, temperature=0.0, max_tokens=12)
    assert in_process == served_out


def test_unchecked_oversized_adapter_is_a_setup_error_and_the_server_stays_up(served):
    big = pack_weights(perturbed_lora_adapter(served["model_dir"], served["root"] / "r16b", seed=6, r=16))
    with pytest.raises(LLMSetupError, match="HTTP 500.*greater than max_lora_rank"):
        policy_llm(_policy(served), big)
    assert served["server"].healthy()
    assert len(policy_llm(_policy(served)).generate(PROMPTS[:1], max_tokens=4)[0]) == 1
