"""One LLM interface for every step: ``generate(prompts, n, temperature, max_tokens, seed, json_schema)``.

Engines behind it (chosen by ``EngineKind`` in config, built by :func:`make_llm`):
- ``openai``: any OpenAI-compatible HTTP server (vLLM, llama.cpp server, hosted endpoints).
- ``llamacpp``: in-process llama.cpp (lazy import).
- ``vllm``: in-process ``vllm.LLM`` (lazy import; only in a vLLM environment).
- ``scripted``: canned outputs keyed by prompt, for offline deterministic tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

from autoif.config import EngineConfig, EngineKind


@dataclass
class Usage:
    """Counters every engine keeps: requests sent, prompts asked, tokens used, retries."""

    requests: int = 0
    prompts: int = 0
    completions: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def as_metrics(self, prefix: str = "llm_") -> dict[str, float]:
        out = {f"{prefix}{k}": float(v) for k, v in vars(self).items() if k != "errors"}
        out.update({f"{prefix}error_{k}": float(v) for k, v in self.errors.items()})
        return out


@runtime_checkable
class LLM(Protocol):
    """What every step sees. Returns ``n`` completions per prompt, in prompt order."""

    usage: Usage

    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        temperature: float = 0.0,
        max_tokens: int = 512,
        seed: int | None = None,
        json_schema: dict | None = None,
    ) -> list[list[str]]: ...

    @property
    def identity(self) -> str:
        """A stable string naming engine + model: part of every cache key of a step that calls the LLM."""
        ...


def make_llm(cfg: EngineConfig) -> LLM:
    """Build the engine the config names. Heavy engines are imported only here."""
    if cfg.kind is EngineKind.scripted:
        from autoif.llm.scripted import ScriptedLLM

        return ScriptedLLM.from_file(cfg.scripted_path)
    if cfg.kind is EngineKind.openai:
        from autoif.llm.openai_http import OpenAIHTTPLLM

        return OpenAIHTTPLLM.from_config(cfg)
    if cfg.kind is EngineKind.llamacpp:
        from autoif.llm.llamacpp import LlamaCppLLM

        return LlamaCppLLM.from_config(cfg)
    if cfg.kind is EngineKind.vllm:
        from autoif.llm.vllm_local import VLLMLocalLLM

        return VLLMLocalLLM.from_config(cfg)
    raise ValueError(f"unknown engine kind {cfg.kind!r}")
