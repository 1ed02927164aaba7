"""One error family for every engine: the same condition raises the same class whichever engine hit it.

- :class:`LLMTransientError`: may succeed on a retry (HTTP 429/5xx, timeouts, connection errors once the
  engine's own retries ran out). The pipeline's Prefect ``retry_condition_fn`` retries exactly these.
- :class:`LLMRequestError`: this request can never succeed as sent; the fault is in one prompt. It names the
  prompt (``prompt_index``) when known and a short ``reason`` code a step keeps on the dropped row:
  :class:`LLMContextOverflowError` ("prompt_too_long"), :class:`LLMRefusedError` ("request_refused"),
  :class:`LLMResponseError` ("malformed_answer").
- :class:`LLMSetupError`: the engine cannot start (package or model missing, base_url unset, bad script file).
- :class:`LLMError` itself: any other engine failure; neither retried nor turned into a row's reason.
"""
from __future__ import annotations

import re
from typing import Any

DETAIL_CHARS = 300  # how much of a server's body (or an engine's message) an error quotes


class LLMError(RuntimeError):
    """The engine could not get completions."""


class LLMTransientError(LLMError):
    """Retries ran out on 429/5xx/timeouts/connection errors; a Prefect retry may still succeed."""


class LLMSetupError(LLMError):
    """The engine cannot start: package missing, model file missing, base_url unset, script file invalid."""


class LLMRequestError(LLMError):
    """This request can never succeed as sent: the fault is in one prompt, not in the engine.

    ``prompt_index``: which prompt of the ``generate`` call, when known. ``outcomes``: set by an engine that
    ran the whole batch before raising: per prompt, its completions or the ``LLMRequestError`` it raised, so
    :func:`autoif.llm.generate_each` need not ask again (not pickled: a task's failed state stays small).
    """

    reason = "request_refused"

    def __init__(self, message: str, *, prompt_index: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.prompt_index = prompt_index
        if reason is not None:
            self.reason = reason
        self.outcomes: list[list[str] | LLMRequestError] | None = None

    def __str__(self) -> str:
        message = super().__str__()
        return message if self.prompt_index is None else f"prompt {self.prompt_index}: {message}"

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), self.args, {"prompt_index": self.prompt_index, "reason": self.reason, "outcomes": None}


class LLMContextOverflowError(LLMRequestError):
    """The prompt (plus the tokens asked for) does not fit the model's context window."""

    reason = "prompt_too_long"


class LLMRefusedError(LLMRequestError):
    """The engine refused this request (an HTTP 4xx other than a context overflow, an invalid input)."""

    reason = "request_refused"


class LLMResponseError(LLMRequestError):
    """The engine answered, but not with a usable completion (garbage body, wrong shape)."""

    reason = "malformed_answer"


class MissingScriptError(LLMError):
    """The scripted engine has no canned output for this prompt: the test's script is incomplete. Not a row's
    reason: the step fails, naming the prompt (a test author wants to know, not a quiet drop)."""


# What each engine says when a prompt does not fit (matched case-insensitively):
_CONTEXT_OVERFLOW = re.compile(
    "|".join(
        [
            r"exceed context window",  # llama-cpp-python in-process: "Requested tokens (N) exceed context window of M"
            r"exceeds? the available context size",  # llama.cpp server: "request (N tokens) exceeds the available context size (M tokens)"
            r"exceed_context_size",  # llama.cpp server error type
            r"maximum context length",  # vLLM server, llama-cpp-python server, OpenAI: "This model's maximum context length is M tokens..."
            r"context_length_exceeded",  # OpenAI-style error code
            r"longer than the maximum model length",  # vLLM engine: "The decoder prompt (length N) is longer than the maximum model length of M"
        ]
    ),
    re.IGNORECASE,
)
OVERFLOW_STATUS = {400, 413, 422}  # the statuses a server answers a too-long prompt with
SETUP_STATUS = {401, 403, 404}  # wrong key, wrong URL or model name: no prompt of the run can succeed


def is_context_overflow(message: str) -> bool:
    """Does an engine's error message say the prompt does not fit the model's context window?"""
    return bool(_CONTEXT_OVERFLOW.search(message))


def http_error(url: str, status: int, body: str, prompt_index: int | None = None) -> LLMError:
    """The error for a non-retryable HTTP status (>= 400) a server answered one request with."""
    message = f"{url}: HTTP {status}: {body[:DETAIL_CHARS]}"
    if status in OVERFLOW_STATUS and is_context_overflow(body):
        return LLMContextOverflowError(message, prompt_index=prompt_index)
    if status in SETUP_STATUS or "model_not_found" in body:  # llama-cpp-python's server: 400 model_not_found
        return LLMSetupError(message)
    if 400 <= status < 500:
        return LLMRefusedError(message, prompt_index=prompt_index)
    return LLMError(message)
