"""The in-process vLLM engine's error mapping and seeds, against a stand-in ``vllm`` module.

vLLM cannot be installed next to this stack (its torch and fastapi pins clash with ours), so a small module takes its place with
the behaviour that matters here, as vLLM 0.32 has it: ``LLM.generate`` validates the whole batch first and,
when one prompt is longer than ``max_model_len``, aborts the batch with a ``VLLMValidationError`` (a
``VLLMClientError``, not a ValueError) that names no prompt.
"""
import sys
import types
from dataclasses import dataclass, field

import pytest

from autoif.llm import (
    LLMContextOverflowError,
    LLMError,
    LLMRefusedError,
    LLMSetupError,
    generate_each,
    usage_scope,
)
from autoif.llm.vllm_local import VLLMLocalLLM

MAX_MODEL_LEN = 40  # "tokens" are characters here


def fake_vllm() -> types.ModuleType:
    vllm = types.ModuleType("vllm")
    exceptions = types.ModuleType("vllm.exceptions")

    class VLLMClientError(Exception):
        pass

    class VLLMValidationError(VLLMClientError):
        pass

    exceptions.VLLMClientError, exceptions.VLLMValidationError = VLLMClientError, VLLMValidationError

    @dataclass
    class SamplingParams:
        n: int = 1
        temperature: float = 1.0
        max_tokens: int = 16
        seed: int | None = None
        structured_outputs: object = None

    @dataclass
    class Completion:
        index: int
        text: str
        token_ids: list = field(default_factory=list)

    @dataclass
    class RequestOutput:
        prompt_token_ids: list
        outputs: list

    class LLM:
        def __init__(self, model, max_model_len, **kwargs):
            if model == "missing":
                raise OSError(f"no model at {model}")
            self.batches: list[list[str]] = []

        def generate(self, prompts, params, use_tqdm=True):
            self.batches.append(list(prompts))
            for p in prompts:
                if not p:
                    raise VLLMValidationError("The decoder prompt cannot be empty")
                if len(p) > MAX_MODEL_LEN:
                    raise VLLMValidationError(
                        f"The decoder prompt (length {len(p)}) is longer than the maximum model length of {MAX_MODEL_LEN}. "
                        "Make sure that `max_model_len` is no smaller than the number of text tokens."
                    )
            return [RequestOutput(list(range(len(p))), [Completion(j, f"{p}|{sp.seed + j}", [0, 0]) for j in range(sp.n)])
                    for p, sp in zip(prompts, params)]

    vllm.LLM, vllm.SamplingParams, vllm.exceptions = LLM, SamplingParams, exceptions
    return vllm


@pytest.fixture
def vllm_module(monkeypatch):
    module = fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.exceptions", module.exceptions)
    return module


def test_one_prompt_too_long_aborts_the_batch_and_generate_each_asks_prompt_by_prompt(vllm_module):
    llm = VLLMLocalLLM("tiny", chat=False)
    long = "x" * 100
    with pytest.raises(LLMContextOverflowError, match="longer than the maximum model length") as info:
        llm.generate(["a", long, "b"], n=2, temperature=0.7, seed=10)
    assert info.value.prompt_index is None and info.value.outcomes is None  # vLLM names no prompt
    with usage_scope() as u:
        gens = generate_each(llm, ["a", long, "b"], n=2, temperature=0.7, seed=10)
    assert gens.errors == [None, "prompt_too_long", None]
    # the seeds each prompt has in the batch (seed + i * n): the texts a clean batch call gives
    assert gens.texts[0] == ["a|10", "a|11"] and gens.texts[2] == ["b|14", "b|15"]
    assert llm._llm.batches[-3:] == [["a"], [long], ["b"]]
    assert (u.requests, u.completions, u.prompt_tokens, u.errors) == (4, 4, 2, {"prompt_too_long": 2})


def test_other_client_errors_are_refusals_and_setup_failures_are_setup_errors(vllm_module):
    llm = VLLMLocalLLM("tiny", chat=False)
    with pytest.raises(LLMRefusedError, match="cannot be empty") as info:
        llm.generate([""])
    assert info.value.prompt_index == 0 and info.value.reason == "request_refused"
    with pytest.raises(LLMSetupError, match="vLLM cannot start"):
        VLLMLocalLLM("missing").generate(["a"])
    with pytest.raises(LLMSetupError, match="model_path"):
        from autoif.config import EngineConfig, EngineKind

        VLLMLocalLLM.from_config(EngineConfig(kind=EngineKind.vllm))


def test_vllm_missing_is_a_setup_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails
    with pytest.raises(LLMSetupError, match="vllm is not importable"):
        VLLMLocalLLM("tiny").generate(["a"])
    assert issubclass(LLMSetupError, LLMError)
