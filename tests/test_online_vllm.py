"""Online iterations on the production path: the policy samples from a real vLLM (CPU) server by adapter name.

The test starts ``infra/vllm_server.sh`` (through :class:`tests.vllm_lora.VLLMLoRAServer`) on a free loopback
port with runtime LoRA loading, serving the tiny Qwen2 dir the script builds; the pipeline trains that same
dir locally with transformers (``policy.model_path``), so every adapter it makes fits the served base. Two
online iterations with ``policy.engine=vllm``: iteration 1 samples from the offline DPO adapter, loaded by
name through ``/v1/load_lora_adapter``; the sandbox scores, DPO trains; iteration 2 samples from iteration 1's
adapter, under another name. Slow: a server start is about 30 s (the first run on a machine also creates the
vLLM venv, about 3 minutes); skipped when no vLLM environment is there.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.test_stage_b_flow import stage_b_cfg  # noqa: F401  (fixture)
from tests.test_stage_c_flow import stage_c_cfg  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def _vllm_available() -> bool:
    """vLLM importable here, or in the venv infra/vllm_server.sh made (it cannot share the project's env)."""
    if importlib.util.find_spec("vllm") is not None:
        return True
    cache = Path(os.environ.get("AUTOIF_CACHE") or Path.home() / ".cache" / "autoif").expanduser()
    python = cache / "vllm-venv" / "bin" / "python"
    if not (cache / "vllm-venv" / ".autoif-ok").is_file() or not python.is_file():
        return False
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    return subprocess.run([str(python), "-c", probe], capture_output=True, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not _vllm_available():
        pytest.skip("vllm is not importable (no vLLM environment; `infra/vllm_server.sh install` makes one)")
    from tests.conftest import free_port
    from tests.vllm_lora import VLLMLoRAServer, tiny_vllm_model_dir

    model_dir = tiny_vllm_model_dir()
    root = tmp_path_factory.mktemp("online_vllm")
    server = VLLMLoRAServer(port=free_port(), model_dir=model_dir, run_dir=root / "run")
    try:
        url = server.start()
        print(f"\n[vLLM] healthy after {server.startup_s:.1f} s on {url}")
        yield {"url": url, "model_dir": model_dir, "root": root, "server": server}
    finally:
        server.stop()


def _models(url: str) -> dict[str, str | None]:
    data = httpx.get(url.rstrip("/") + "/models", timeout=30).json()["data"]
    return {m["id"]: m.get("root") for m in data}


def test_two_online_iterations_sample_from_the_served_adapters(prefect_harness, served, stage_c_cfg):  # noqa: F811
    from autoif.flows.pipeline import autoif_pipeline

    from autoif.config import PipelineStep
    from autoif.policy import policy_model_name
    from autoif.store import Store

    from tests.vllm_lora import MAX_LORA_RANK

    cfg = stage_c_cfg.model_validate({**stage_c_cfg.model_dump(), "policy": {
        "model": served["server"].served_name, "model_path": str(served["model_dir"]), "device": "cpu",
        "engine": "vllm", "base_url": served["url"], "adapter_root": str(served["root"] / "adapters"),
        "max_lora_rank": MAX_LORA_RANK, "timeout_s": 120},
        "online": {"iterations": 2, "samples_per_prompt": 6, "max_new_tokens": 6, "max_prompts": 4,
                   "quality_gate": False, "dpo": {"max_steps": 1}}})
    assert "autoif-" not in "".join(_models(served["url"]))  # a fresh server: no adapter loaded yet

    refs = autoif_pipeline(cfg, until=PipelineStep.online)
    store = Store.from_config(cfg.store)

    dpo, _ = store.read_step(refs["train_dpo"])
    assert "online1_train" in refs, "iteration 1 made no pairs: nothing trained, iteration 2 would reuse its adapter"
    first, _ = store.read_step(refs["online1_train"])
    assert first["model_id"].iloc[0] == "online-1" and first["parent"].iloc[0] == "dpo"
    names = [policy_model_name(bytes(m["weights"].iloc[0])) for m in (dpo, first)]  # iteration 1's, iteration 2's
    assert names[0] != names[1]

    models = _models(served["url"])
    assert {served["server"].served_name, *names} <= set(models), models  # both loaded by name, both still served
    for name in names:
        assert Path(models[name]).name == name.removeprefix("autoif-")  # from adapter_root/<digest>
        assert Path(models[name]).parent == served["root"] / "adapters"

    for i in (1, 2):  # each iteration's policy samples are stored, K per prompt, and were scored in the sandbox
        samples, _ = store.read_step(refs[f"online{i}_samples"])
        assert len(samples) == 4 * 6 and samples["response_index"].max() == 5
        assert samples["response"].notna().all() and (samples["reason"].isna() | (samples["reason"] == "empty_response")).all()
        usage = store.manifest(refs[f"online{i}_samples"].run, f"online{i}_samples", refs[f"online{i}_samples"].key).meta["usage"]
        assert usage.get("llm_requests", 0) > 0, usage  # over HTTP, from the server
        verified, _ = store.read_step(refs[f"online{i}_verification"])
        assert len(verified) and verified["pass_rate"].between(0, 1).all()

    # the server saw each adapter loaded and asked for by name: iteration 1 from the DPO adapter, 2 from online-1
    log = served["server"].log_path.read_text(errors="replace")
    assert log.count("/v1/load_lora_adapter") >= 2, log[-3000:]
    print("online adapters served:", names)
