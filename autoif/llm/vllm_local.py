"""In-process vLLM engine (``vllm.LLM``, imported lazily). Optional: it runs only inside a vLLM environment.

vLLM's pins (torch, fastapi) clash with this project's stack (../shared/STACK.md), so the usual way to use
vLLM here is its OpenAI server in its own venv (``infra/vllm_server.sh``) driven by the HTTP engine. This engine
is for a job that runs inside such an env: one batched ``generate``/``chat`` call per ``generate``, server-side
``n`` and ``seed`` through ``SamplingParams``, and ``json_schema`` as structured (guided) decoding.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

from autoif.config import EngineConfig
from autoif.llm import Usage


class VLLMLocalError(RuntimeError):
    """vLLM is missing or the model dir is not set."""


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
            raise VLLMLocalError("engine.model_path (a model dir) is required for engine.kind=vllm")
        return cls(model_path=cfg.model_path, chat=cfg.chat, max_model_len=cfg.n_ctx)

    @property
    def identity(self) -> str:
        return f"vllm:{self.model_path}:{'chat' if self.chat else 'completion'}"

    def _engine(self) -> Any:
        if self._llm is None:
            try:
                import vllm
            except ImportError as e:
                raise VLLMLocalError(
                    "vllm is not importable here: run inside a vLLM environment (infra/vllm_server.sh install "
                    "creates one) or use the vLLM OpenAI server with engine.kind=openai"
                ) from e
            self._llm = vllm.LLM(
                model=self.model_path,
                max_model_len=self.max_model_len,
                dtype=self.dtype,
                seed=self.engine_seed,
                **({"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}} if self.compact_json else {}),
                **self.engine_kwargs,
            )
        return self._llm

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
            params = [
                self._sampling(n, temperature, max_tokens, None if seed is None else seed + i * n, json_schema)
                for i in range(len(prompts))
            ]
            self.usage.requests += 1
            if self.chat:
                outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
            else:
                outputs = llm.generate(list(prompts), params, use_tqdm=False)
        result: list[list[str]] = []
        for out in outputs:
            texts = [c.text for c in sorted(out.outputs, key=lambda c: c.index)]
            self.usage.prompt_tokens += len(out.prompt_token_ids or [])
            self.usage.completion_tokens += sum(len(c.token_ids) for c in out.outputs)
            self.usage.completions += len(texts)
            result.append(texts)
        self.usage.prompts += len(prompts)
        return result
