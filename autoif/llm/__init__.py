"""One LLM interface for every step: ``generate(prompts, n, temperature, max_tokens, seed, json_schema)``.

Engines behind it (chosen by ``EngineKind`` in config, built by :func:`make_llm`):
- ``openai``: any OpenAI-compatible HTTP server (vLLM, llama.cpp server, hosted endpoints).
- ``llamacpp``: in-process llama.cpp (lazy import).
- ``vllm``: in-process ``vllm.LLM`` (lazy import; only in a vLLM environment).
- ``scripted``: canned outputs keyed by prompt, for offline deterministic tests.

Every engine raises the one error family of :mod:`autoif.llm.errors` (re-exported here), counts through
:func:`count` into its own ``usage`` and into the caller's :func:`usage_scope`, and works with
:func:`generate_each`, which turns one prompt's fault into that prompt's ``reason`` instead of a failed batch.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass, field, fields
from typing import Iterator, Protocol, Sequence, runtime_checkable

from autoif.config import EngineConfig, EngineKind
from autoif.llm.errors import (
    DETAIL_CHARS,
    LLMContextOverflowError,
    LLMError,
    LLMRefusedError,
    LLMRequestError,
    LLMResponseError,
    LLMSetupError,
    LLMTransientError,
    MissingScriptError,
)

__all__ = [
    "LLM", "Usage", "count", "usage_scope", "Generations", "generate_each", "make_llm",
    "LLMError", "LLMTransientError", "LLMRequestError", "LLMContextOverflowError", "LLMRefusedError",
    "LLMResponseError", "LLMSetupError", "MissingScriptError",
]

_USAGE_LOCK = threading.Lock()  # engines are shared by threads; `x += 1` on a shared counter is not atomic


@dataclass
class Usage:
    """Counters every engine keeps: requests sent, prompts asked, tokens used, retries, errors by kind."""

    requests: int = 0
    prompts: int = 0
    completions: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def add(
        self,
        requests: int = 0,
        prompts: int = 0,
        completions: int = 0,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        retries: int = 0,
        error: str | None = None,
    ) -> None:
        with _USAGE_LOCK:
            self.requests += requests
            self.prompts += prompts
            self.completions += completions
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.retries += retries
            if error is not None:
                self.errors[error] = self.errors.get(error, 0) + 1

    def __add__(self, other: Usage) -> Usage:
        out = Usage(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name != "errors"})
        out.errors = {k: self.errors.get(k, 0) + other.errors.get(k, 0) for k in {**self.errors, **other.errors}}
        return out

    def as_dict(self) -> dict[str, int | dict[str, int]]:
        with _USAGE_LOCK:
            return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "errors"}, "errors": dict(self.errors)}

    def as_metrics(self, prefix: str = "llm_") -> dict[str, float]:
        d = self.as_dict()
        errors = d.pop("errors")
        out = {f"{prefix}{k}": float(v) for k, v in d.items()}
        out.update({f"{prefix}error_{k}": float(v) for k, v in errors.items()})
        return out


# The usage_scope()s open in this thread/task, innermost last. A ContextVar: asyncio tasks copy it, so the
# requests an engine runs as tasks count into the scope of the thread that called `generate`.
_SCOPES: contextvars.ContextVar[tuple[Usage, ...]] = contextvars.ContextVar("autoif_llm_usage_scopes", default=())


def count(usage: Usage, **deltas: int | str | None) -> None:
    """How every engine counts: into its own ``usage`` and into each :func:`usage_scope` open here."""
    usage.add(**deltas)
    for scope in _SCOPES.get():
        if scope is not usage:
            scope.add(**deltas)


@contextlib.contextmanager
def usage_scope() -> Iterator[Usage]:
    """Usage of the LLM calls made inside this block by this thread/task, whatever else shares the engine.

    Several batches of a step may run at once in threads of one process, sharing one engine; its ``usage``
    counts them all, the Usage this yields only this block's. Scopes nest: an outer one counts the inner's.
    """
    usage = Usage()
    token = _SCOPES.set(_SCOPES.get() + (usage,))
    try:
        yield usage
    finally:
        _SCOPES.reset(token)


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


@dataclass
class Generations:
    """Per prompt of a :func:`generate_each` call: its ``n`` completions, or why it has none."""

    texts: list[list[str] | None]  # n completions, or None when the prompt failed
    errors: list[str | None]  # None, or the LLMRequestError's reason code ("prompt_too_long", ...)
    details: list[str | None]  # None, or the error's message (at most DETAIL_CHARS characters)

    @classmethod
    def from_outcomes(cls, outcomes: Sequence[list[str] | LLMRequestError]) -> Generations:
        failed = [o if isinstance(o, LLMRequestError) else None for o in outcomes]
        return cls(
            texts=[None if e is not None else list(o) for o, e in zip(outcomes, failed)],
            errors=[None if e is None else e.reason for e in failed],
            details=[None if e is None else str(e)[:DETAIL_CHARS] for e in failed],
        )


def generate_each(
    llm: LLM,
    prompts: Sequence[str],
    n: int = 1,
    temperature: float = 0.0,
    max_tokens: int = 512,
    seed: int | None = None,
    json_schema: dict | None = None,
) -> Generations:
    """``llm.generate`` for a batch in which one bad prompt costs its own row, not the batch.

    One ``generate`` call for the whole batch; when it raises an :class:`LLMRequestError`, the outcomes the
    engine attached to it (every engine here but in-process vLLM runs the whole batch first) or else one call
    per prompt, with the seed that prompt had in the batch call (``seed + i * n``, as every engine derives
    it), so its completions equal the batch call's. :class:`LLMTransientError`, :class:`LLMSetupError` and any
    other :class:`LLMError` propagate: the task retries or fails.
    """
    prompts = list(prompts)
    kwargs = {"n": n, "temperature": temperature, "max_tokens": max_tokens, "json_schema": json_schema}
    try:
        texts = llm.generate(prompts, seed=seed, **kwargs)
    except LLMRequestError as e:
        batch_error = e
    else:
        return Generations(texts=list(texts), errors=[None] * len(prompts), details=[None] * len(prompts))
    known = batch_error.outcomes
    if known is None or len(known) != len(prompts):
        known = [batch_error] if len(prompts) == 1 else None
    if known is not None:
        return Generations.from_outcomes(known)
    outcomes: list[list[str] | LLMRequestError] = []
    for i, prompt in enumerate(prompts):
        try:
            outcomes.append(llm.generate([prompt], seed=None if seed is None else seed + i * n, **kwargs)[0])
        except LLMRequestError as e:
            e.prompt_index = i  # of the batch, not of the one-prompt call
            outcomes.append(e)
    return Generations.from_outcomes(outcomes)
