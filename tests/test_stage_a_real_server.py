"""Stage A against a real llama.cpp server with the small embedded model (Gemma 3 270M, base model).

Yield may be 0 (a 270M base model rarely writes a correct verifier); the run must complete, call the real
server, and write valid outputs for every step.
"""
import os
import subprocess
from pathlib import Path

import pytest
from autoif.flows.instructions import build_instructions

from autoif.store import Store
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def llamacpp_server():
    port = str(free_port())
    env = {**os.environ, "AUTOIF_LLAMACPP_PORT": port}
    script = ROOT / "infra" / "llamacpp_server.sh"
    started = subprocess.run([str(script), "start"], env=env, capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        pytest.fail(f"llama.cpp server did not start:\n{started.stderr[-2000:]}")
    yield started.stdout.strip().splitlines()[-1]
    subprocess.run([str(script), "stop"], env=env, capture_output=True, text=True, timeout=60)


def test_stage_a_on_the_real_small_model(prefect_harness, make_cfg, llamacpp_server, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"family": "case", "instruction": "Answer in all lowercase letters."}\n'
                     '{"family": "length", "instruction": "Answer with at most 20 words."}\n')
    cfg = make_cfg({
        "run_name": "real", "engine.kind": "openai", "engine.base_url": llamacpp_server, "engine.model": "gemma3-270m",
        "engine.max_concurrency": 1, "self_instruct.seeds_path": str(seeds), "self_instruct.n_calls": 1,
        "self_instruct.max_tokens": 96, "verifier_synthesis.n_completions": 1, "verifier_synthesis.max_tokens": 160,
        "back_translation.max_tokens": 64, "consistency_filter.max_tokens": 64, "consistency_filter.mode": "llm_judge",
        # llama-cpp-python's server returns one choice whatever n is (the engine then rejects the reply), and rejects response_format type json_schema (HTTP 500; it takes json_object + schema)
        "verifier_synthesis.use_json_schema": False, "back_translation.use_json_schema": False,
        "consistency_filter.use_json_schema": False,
    })
    refs = build_instructions(cfg)
    store = Store(cfg.store.root)
    for name, ref in refs.items():
        df, _ = store.read_step(ref)  # valid: every step wrote Parquet that passed its schema
        assert "reason" in df.columns, name
    cand, _ = store.read_step(refs["verifier_synthesis"])
    assert len(cand) >= 2 and cand["raw"].str.len().sum() > 0  # the server answered every prompt
