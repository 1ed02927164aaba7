"""In-process vLLM engine (``vllm.LLM``, imported lazily). Optional: it runs only inside a vLLM environment.

vLLM's pins (torch, fastapi) clash with this project's stack (../shared/STACK.md), so the usual way to use
vLLM here is its OpenAI server in its own venv (``infra/vllm_server.sh``) driven by the HTTP engine. This engine
is for a job that runs inside such an env: one batched ``generate``/``chat`` call per ``generate``, server-side
``n`` and ``seed`` through ``SamplingParams``, and ``json_schema`` as structured (guided) decoding.

Errors: vllm missing, model dir unset or the engine failing to start -> :class:`LLMSetupError`; a prompt
longer than ``max_model_len`` -> :class:`LLMContextOverflowError`, another request vLLM rejects (its
``VLLMClientError``, e.g. an empty prompt) -> :class:`LLMRefusedError`, both for the whole batch (vLLM validates
the batch up front and aborts it; ``prompt_index`` only for a one-prompt batch, so
:func:`autoif.llm.generate_each` asks prompt by prompt); anything else -> :class:`LLMError`.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from autoif.config import EngineConfig
from autoif.llm import Usage, count
from autoif.llm.errors import (
    DETAIL_CHARS,
    LLMContextOverflowError,
    LLMError,
    LLMRefusedError,
    LLMSetupError,
    is_context_overflow,
)


class VLLMLocalLLM:
    def __init__(
        self,
        model_path: str | Path,
        chat: bool = True,
        max_model_len: int | None = 2048,
        dtype: str = "auto",
        engine_seed: int = 0,
        compact_json: bool = True,
        **engine_kwargs: Any,
    ) -> None:
        self.model_path = str(model_path)
        self.chat = chat
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.engine_seed = engine_seed
        # No free whitespace inside constrained JSON (an engine-wide setting in vLLM, not per request): a
        # weak model otherwise can spend its whole token budget on blanks and never close the object.
        self.compact_json = compact_json
        self.engine_kwargs = engine_kwargs
        self.usage = Usage()
        self._llm: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> "VLLMLocalLLM":
        if not cfg.model_path:
            raise LLMSetupError("engine.model_path (a model dir) is required for engine.kind=vllm")
        return cls(model_path=cfg.model_path, chat=cfg.chat, max_model_len=cfg.n_ctx)

    @property
    def identity(self) -> str:
        return f"vllm:{self.model_path}:{'chat' if self.chat else 'completion'}"

    def _engine(self) -> Any:
        if self._llm is None:
            try:
                import vllm
            except ImportError as e:
                raise LLMSetupError(
                    "vllm is not importable here: run inside a vLLM environment (infra/vllm_server.sh install "
                    "creates one) or use the vLLM OpenAI server with engine.kind=openai"
                ) from e
            try:
                self._llm = vllm.LLM(
                    model=self.model_path,
                    max_model_len=self.max_model_len,
                    dtype=self.dtype,
                    seed=self.engine_seed,
                    **({"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}} if self.compact_json else {}),
                    **self.engine_kwargs,
                )
            except Exception as e:  # a bad model dir, too little memory, an unsupported model: vLLM raises many types
                raise LLMSetupError(f"vLLM cannot start on {self.model_path}: {type(e).__name__}: {e}") from e
        return self._llm

    def _request_error(self, e: Exception, n_prompts: int) -> LLMError:
        """vLLM's exception for a batch, in the engine's family (one prompt's fault, or an engine failure)."""
        message = f"vLLM on {self.model_path}: {type(e).__name__}: {str(e)[:DETAIL_CHARS]}"
        index = 0 if n_prompts == 1 else None
        if is_context_overflow(str(e)):
            return LLMContextOverflowError(message, prompt_index=index)
        client_error = getattr(sys.modules.get("vllm.exceptions"), "VLLMClientError", None)  # newer vLLM
        if client_error is not None and isinstance(e, client_error):
            return LLMRefusedError(message, prompt_index=index)
        return LLMError(message)

    def _sampling(self, n: int, temperature: float, max_tokens: int, seed: int | None, json_schema: dict | None) -> Any:
        from vllm import SamplingParams

        kwargs: dict[str, Any] = {"n": n, "temperature": temperature, "max_tokens": max_tokens, "seed": seed}
        if json_schema is not None:
            from vllm.sampling_params import StructuredOutputsParams

            kwargs["structured_outputs"] = StructuredOutputsParams(json=json_schema)
        return SamplingParams(**kwargs)

    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        temperature: float = 0.0,
        max_tokens: int = 512,
        seed: int | None = None,
        json_schema: dict | None = None,
    ) -> list[list[str]]:
        if not prompts:
            return []
        with self._lock:
            llm = self._engine()
            # One SamplingParams per prompt: a distinct, reproducible seed each (seed + i*n keeps the n
            # completions of one prompt from repeating another prompt's).
            try:
                params = [
                    self._sampling(n, temperature, max_tokens, None if seed is None else seed + i * n, json_schema)
                    for i in range(len(prompts))
                ]
            except Exception as e:  # the same parameters for every prompt: not one prompt's fault
                raise LLMError(f"vLLM rejects the sampling parameters: {type(e).__name__}: {str(e)[:DETAIL_CHARS]}") from e
            count(self.usage, requests=1, prompts=len(prompts))
            try:
                if self.chat:
                    outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
                else:
                    outputs = llm.generate(list(prompts), params, use_tqdm=False)
            except Exception as e:  # vLLM validates the whole batch before it generates, and aborts it on a fault
                err = self._request_error(e, len(prompts))
                count(self.usage, error=getattr(err, "reason", type(e).__name__))
                raise err from e
        result: list[list[str]] = []
        for out in outputs:
            texts = [c.text for c in sorted(out.outputs, key=lambda c: c.index)]
            count(
                self.usage,
                completions=len(texts),
                prompt_tokens=len(out.prompt_token_ids or []),
                completion_tokens=sum(len(c.token_ids) for c in out.outputs),
            )
            result.append(texts)
        return result
