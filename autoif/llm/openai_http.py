"""OpenAI-compatible HTTP engine: vLLM server, llama.cpp server, any hosted endpoint.

Bounded concurrency, retries with exponential backoff on 429/5xx/timeouts/connection errors, server-side
``n``, JSON-schema ``response_format`` (vLLM and llama.cpp both honour it), token usage recorded.
Failures map into :mod:`autoif.llm.errors`: retries run out -> :class:`LLMTransientError`; a 4xx naming the
context window -> :class:`LLMContextOverflowError`; 401/403/404 -> :class:`LLMSetupError`; any other 4xx ->
:class:`LLMRefusedError`; a body that is not the JSON an OpenAI server sends -> :class:`LLMResponseError`, never
a silent empty. Every prompt of a batch runs to its end before a per-prompt fault is raised.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import os
import random
import time
from typing import Any, Sequence

import httpx

from autoif.config import EngineConfig, JsonFormat
from autoif.llm import Usage, count
from autoif.llm.errors import (  # LLMError, LLMResponseError, LLMTransientError: importable from here too (old home)
    DETAIL_CHARS,
    LLMRequestError,
    LLMResponseError,
    LLMSetupError,
    LLMTransientError,
    http_error,
)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIHTTPLLM:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        max_concurrency: int = 8,
        max_retries: int = 5,
        timeout_s: float = 120.0,
        backoff_s: float = 0.5,
        chat: bool = True,
        json_format: JsonFormat = JsonFormat.auto,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.chat = chat
        # How a JSON schema is sent: "json_schema" (OpenAI, vLLM), "json_object" (llama.cpp server:
        # {"type": "json_object", "schema": ...}), or "auto": json_schema first, then json_object once the
        # server rejects it (remembered for this instance).
        self.json_format = JsonFormat(json_format)
        # Does the server honour `n`? None = not known yet. llama.cpp's server ignores it and answers one
        # choice; then the n completions are n requests (seeds s, s+1, ...).
        self.server_n: bool | None = None
        self.usage = Usage()

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> "OpenAIHTTPLLM":
        if not cfg.base_url:
            raise LLMSetupError("engine.base_url is required for engine.kind=openai (e.g. http://127.0.0.1:8000/v1)")
        return cls(
            base_url=cfg.base_url,
            model=cfg.model,
            api_key=os.environ.get(cfg.api_key_env),
            max_concurrency=cfg.max_concurrency,
            max_retries=cfg.max_retries,
            timeout_s=cfg.timeout_s,
            backoff_s=cfg.backoff_s,
            chat=cfg.chat,
            json_format=cfg.json_format,
        )

    @property
    def identity(self) -> str:
        return f"openai:{self.base_url}:{self.model}:{'chat' if self.chat else 'completion'}"

    def load_lora_adapter(self, name: str, path: str | os.PathLike[str]) -> bool:
        """Load a peft adapter into this (vLLM) server under ``name``: see :func:`load_lora_adapter`."""
        return load_lora_adapter(self.base_url, name, path, api_key=self.api_key, timeout_s=self.timeout_s)

    # --- public sync facade ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        temperature: float = 0.0,
        max_tokens: int = 512,
        seed: int | None = None,
        json_schema: dict | None = None,
    ) -> list[list[str]]:
        coro = self.agenerate(prompts, n, temperature, max_tokens, seed, json_schema)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        # Called from inside a running loop (e.g. an async Prefect task): run on a private loop in a thread,
        # in this context, so the caller's usage_scope counts the requests.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(contextvars.copy_context().run, asyncio.run, coro).result()

    async def agenerate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        temperature: float = 0.0,
        max_tokens: int = 512,
        seed: int | None = None,
        json_schema: dict | None = None,
    ) -> list[list[str]]:
        sem = asyncio.Semaphore(self.max_concurrency)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=self.timeout_s) as client:

            async def one(i: int, prompt: str) -> list[str]:
                # Per-prompt seed keeps prompts distinct while the run stays reproducible; a server derives
                # seeds s, s+1, ... for the n choices, so prompts are n apart.
                s = None if seed is None else seed + i * n
                async with sem:
                    if n > 1 and temperature == 0:
                        # Greedy choices are identical, and vLLM rejects n > 1 with greedy sampling.
                        texts = await self._post(client, self._body(prompt, 1, temperature, max_tokens, s, json_schema), 1)
                        return texts * n
                    if self.server_n is not False:
                        texts = await self._post(client, self._body(prompt, n, temperature, max_tokens, s, json_schema), n)
                        if len(texts) == n:
                            if n > 1:
                                self.server_n = True
                            return texts
                        self.server_n = False  # answered one choice for n > 1
                    else:
                        texts = []
                    for j in range(len(texts), n):
                        sj = None if s is None else s + j
                        texts += await self._post(client, self._body(prompt, 1, temperature, max_tokens, sj, json_schema), 1)
                    return texts

            count(self.usage, prompts=len(prompts))
            # Every prompt runs to its end: a fault in one prompt leaves the others' completions usable.
            out = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)), return_exceptions=True)
        for e in out:  # an engine-wide failure (retries ran out, setup) outranks a prompt's own fault
            if isinstance(e, BaseException) and not isinstance(e, LLMRequestError):
                raise e
        failed = [(i, e) for i, e in enumerate(out) if isinstance(e, LLMRequestError)]
        for i, e in failed:
            e.prompt_index = i
        if failed:
            failed[0][1].outcomes = list(out)
            raise failed[0][1]
        return list(out)

    # --- internals ------------------------------------------------------------------------------------
    def _body(self, prompt: str, n: int, temperature: float, max_tokens: int, seed: int | None, json_schema: dict | None) -> dict:
        body: dict[str, Any] = {"model": self.model, "n": n, "temperature": temperature, "max_tokens": max_tokens}
        if seed is not None:
            body["seed"] = seed
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if json_schema is not None:
            body["response_format"] = self._response_format(json_schema)
        return body

    def _response_format(self, json_schema: dict) -> dict:
        if self.json_format is JsonFormat.json_object:
            return {"type": "json_object", "schema": json_schema}
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": json_schema, "strict": True}}

    def _rejects_json_schema(self, body: dict, resp: httpx.Response) -> bool:
        """llama.cpp's server answers a json_schema response_format with a validation error (HTTP 500/422)."""
        return (
            self.json_format is not JsonFormat.json_schema  # "auto", or switched already by a concurrent request
            and resp.status_code in (400, 422, 500)
            and (body.get("response_format") or {}).get("type") == "json_schema"
            and "response_format" in resp.text
        )

    async def _post(self, client: httpx.AsyncClient, body: dict, n: int) -> list[str]:
        path = "/chat/completions" if self.chat else "/completions"
        last: str = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                count(self.usage, retries=1)
                await asyncio.sleep(self.backoff_s * (2 ** (attempt - 1)) * (0.5 + random.random()))
            count(self.usage, requests=1)
            try:
                resp = await client.post(path, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = f"{type(e).__name__}: {e}"
                count(self.usage, error=type(e).__name__)
                continue
            if self._rejects_json_schema(body, resp):
                self.json_format = JsonFormat.json_object
                body = {**body, "response_format": self._response_format(body["response_format"]["json_schema"]["schema"])}
                count(self.usage, error="json_schema_rejected")
                return await self._post(client, body, n)
            if resp.status_code in RETRY_STATUS:
                last = f"HTTP {resp.status_code}: {resp.text[:DETAIL_CHARS]}"
                count(self.usage, error=f"http_{resp.status_code}")
                continue
            if resp.status_code >= 400:
                count(self.usage, error=f"http_{resp.status_code}")
                raise http_error(f"{self.base_url}{path}", resp.status_code, resp.text)
            return self._parse(resp, path, n)
        raise LLMTransientError(f"{self.base_url}{path}: gave up after {self.max_retries + 1} attempts; last error: {last}")

    def _parse(self, resp: httpx.Response, path: str, n: int) -> list[str]:
        try:
            data = resp.json()
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            texts = [c["message"]["content"] if self.chat else c["text"] for c in choices]
            usage = data.get("usage") or {}
            tokens = {"prompt_tokens": int(usage.get("prompt_tokens") or 0), "completion_tokens": int(usage.get("completion_tokens") or 0)}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            count(self.usage, error="bad_response")
            raise LLMResponseError(f"{self.base_url}{path}: not an OpenAI completion response ({e!r}): {resp.text[:DETAIL_CHARS]!r}") from e
        # One choice for n > 1: the server ignores n (llama.cpp); the caller asks for the rest one by one.
        if len(texts) not in (n, 1) or not texts or not all(isinstance(t, str) for t in texts):
            count(self.usage, error="bad_response")
            raise LLMResponseError(f"{self.base_url}{path}: asked for n={n} string completions, got {texts!r:.300}")
        count(self.usage, completions=len(texts), **tokens)
        return texts


# --- runtime LoRA adapters on a vLLM server ------------------------------------------------------------------


def server_root(base_url: str) -> str:
    """``http://host:port`` of an OpenAI base URL (``http://host:port/v1`` -> ``http://host:port``)."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def load_lora_adapter(
    base_url: str,
    name: str,
    path: str | os.PathLike[str],
    api_key: str | None = None,
    timeout_s: float = 300.0,
    max_retries: int = 3,
    backoff_s: float = 0.5,
    max_rank: int | None = None,
) -> bool:
    """Load the peft adapter in ``path`` into the vLLM server at ``base_url`` under ``name``
    (``POST {root}/v1/load_lora_adapter``); afterwards requests with ``model=name`` use it.

    Returns True when this call loaded it, False when the server already had ``name`` loaded from the same
    ``path`` (vLLM answers that with HTTP 400 "has already been loaded": success here). ``name`` loaded from
    another path, a server without runtime LoRA (404: start it with ``--enable-lora`` and
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), an adapter the server cannot take (rank above
    ``--max-lora-rank``, missing files, a path the server cannot read) -> :class:`LLMSetupError`; the server
    unreachable after ``max_retries`` -> :class:`LLMTransientError`. ``path`` must be readable by the server
    process (same machine or a shared filesystem).

    ``max_rank``: the server's ``--max-lora-rank`` (vLLM's default is 16). An adapter of a higher rank is
    refused here, before the request, with a message that says so (vLLM 0.32 answers it with an HTTP 500 whose
    text buries the cause; the server stays up).
    """
    if max_rank is not None:
        rank = adapter_rank(path)
        if rank is not None and rank > max_rank:
            raise LLMSetupError(f"LoRA adapter {path} has rank {rank} > the server's max LoRA rank {max_rank}: "
                                "train with a smaller r or start vLLM with a larger --max-lora-rank")
    root = server_root(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"lora_name": name, "lora_path": str(path)}
    last = ""
    with httpx.Client(base_url=root, headers=headers, timeout=timeout_s) as client:
        for attempt in range(max_retries + 1):
            if attempt:
                time.sleep(backoff_s * (2 ** (attempt - 1)))
            try:
                resp = client.post("/v1/load_lora_adapter", json=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code == 200:
                return True
            text = resp.text[:DETAIL_CHARS]
            if resp.status_code == 400 and "already been loaded" in resp.text:
                loaded_from = _lora_roots(client).get(name)
                if loaded_from is not None and loaded_from != str(path):
                    raise LLMSetupError(f"{root}: LoRA name {name!r} is already loaded from {loaded_from}, not {path}")
                return False
            if resp.status_code == 404:
                raise LLMSetupError(
                    f"{root}/v1/load_lora_adapter: HTTP 404 ({text}): start vLLM with --enable-lora and "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True to load adapters at runtime")
            if resp.status_code in (429, 502, 503, 504):
                last = f"HTTP {resp.status_code}: {text}"
                continue
            alive = _reachable(client)
            raise LLMSetupError(f"{root}/v1/load_lora_adapter {name!r} from {path}: HTTP {resp.status_code}: {text}"
                                + ("" if alive else " (and the server does not answer any more)"))
    raise LLMTransientError(f"{root}/v1/load_lora_adapter: gave up after {max_retries + 1} attempts; last error: {last}")


def _lora_roots(client: httpx.Client) -> dict[str, str]:
    """name -> path of the adapters the server has loaded (its ``/v1/models`` cards with a parent)."""
    try:
        resp = client.get("/v1/models")
        resp.raise_for_status()
        return {m["id"]: m.get("root") for m in resp.json().get("data", []) if m.get("parent")}
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LLMSetupError(f"cannot list the server's loaded adapters: {type(e).__name__}: {e}") from e


def _reachable(client: httpx.Client) -> bool:
    try:
        return client.get("/v1/models", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def adapter_rank(path: str | os.PathLike[str]) -> int | None:
    """The largest LoRA rank of the peft adapter in ``path`` (``r`` and any ``rank_pattern`` value), or None
    when it has no readable ``adapter_config.json``."""
    import json
    from pathlib import Path

    try:
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        ranks = [int(cfg["r"])] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return max(ranks)
