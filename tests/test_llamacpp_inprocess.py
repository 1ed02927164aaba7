"""The in-process llama.cpp engine on the embedded default model (Gemma 3 270M Q4_K_M from PyPI chunks).

Needs llama-cpp-python (``make llamacpp`` installs the cached wheel; ``make test`` does it first).
"""
import json

import jsonschema
import pytest

from autoif.config import EngineConfig, EngineKind
from autoif.llm import (
    LLM,
    LLMContextOverflowError,
    LLMSetupError,
    generate_each,
    make_llm,
)
from autoif.llm.llamacpp import LlamaCppLLM, default_gguf_path

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "score": {"type": "integer", "enum": [1, 2, 3]}},
    "required": ["answer", "score"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def completion_llm():
    llm = make_llm(EngineConfig(kind=EngineKind.llamacpp, chat=False, n_ctx=512, n_threads=2))
    yield llm
    llm.close()


def test_default_model_is_assembled_once_into_the_cache():
    path = default_gguf_path()
    assert path.is_file() and path.stat().st_size > 200_000_000
    assert default_gguf_path() == path


def test_n_completions_per_prompt_with_reproducible_seeds(completion_llm):
    assert isinstance(completion_llm, LlamaCppLLM) and isinstance(completion_llm, LLM)
    prompts = ["The capital of France is", "Once upon a time"]
    out = completion_llm.generate(prompts, n=2, temperature=0.8, max_tokens=8, seed=5)
    assert [len(o) for o in out] == [2, 2] and all(isinstance(t, str) and t for o in out for t in o)
    assert completion_llm.generate(prompts, n=2, temperature=0.8, max_tokens=8, seed=5) == out
    u = completion_llm.usage
    assert (u.requests, u.prompts, u.completions) == (8, 4, 8)  # no server-side n: one call per completion
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 64


def test_greedy_is_deterministic(completion_llm):
    a = completion_llm.generate(["1, 2, 3, 4,"], temperature=0.0, max_tokens=6)
    assert a == completion_llm.generate(["1, 2, 3, 4,"], temperature=0.0, max_tokens=6)


def test_chat_with_json_schema_grammar():
    llm = LlamaCppLLM(chat=True, n_ctx=512, n_threads=2)
    try:
        out = llm.generate(["Is the sky blue? Reply in JSON."], n=3, temperature=0.7, max_tokens=48, seed=1, json_schema=SCHEMA)
    finally:
        llm.close()
    for text in out[0]:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert llm.identity.startswith("llamacpp:gemma3-270m-q4_k_m.gguf:") and llm.identity.endswith(":chat")


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(LLMSetupError, match="not found"):
        LlamaCppLLM(model_path=tmp_path / "nope.gguf")


def test_prompt_longer_than_the_context_costs_only_its_row():
    llm = LlamaCppLLM(chat=False, n_ctx=256, n_threads=2)
    long_prompt = " ".join(f"word{i}" for i in range(2000))
    short = "The capital of France is"
    try:
        with pytest.raises(LLMContextOverflowError, match="exceed context window of 256") as info:
            llm.generate([long_prompt, short], n=2, temperature=0.8, max_tokens=8, seed=5)
        assert info.value.reason == "prompt_too_long" and info.value.prompt_index == 0
        assert llm.usage.errors == {"prompt_too_long": 1}
        gens = generate_each(llm, [long_prompt, short], n=2, temperature=0.8, max_tokens=8, seed=5)
        # the short prompt keeps the seeds it has in the batch (seed + 1 * n): the same texts as asked alone
        alone = llm.generate([short], n=2, temperature=0.8, max_tokens=8, seed=7)[0]
    finally:
        llm.close()
    assert gens.errors == ["prompt_too_long", None] and gens.texts[0] is None
    assert "exceed context window" in gens.details[0]
    assert gens.texts[1] == alone and all(isinstance(t, str) and t for t in alone)
