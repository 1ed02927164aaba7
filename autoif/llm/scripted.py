"""Scripted engine: canned outputs keyed by prompt, so the whole DAG runs offline, deterministically.

File format (JSON or JSONL): records ``{"prompt": str, "outputs": [str, ...]}``. A prompt asked for ``n``
completions gets the first ``n`` outputs (cycled when fewer are canned). Matching is on the exact prompt
text; ``prompt_sha256`` may stand in for ``prompt`` in large files. A prompt with no canned output raises
:class:`MissingScriptError` (an ``LLMError``: the step fails) naming the prompt's hash and
head, so the test author knows what to add. A missing or invalid file is an :class:`LLMSetupError`.

A record may carry ``"error"`` instead of ``"outputs"``: the prompt then fails the way a real engine fails it,
one of :data:`CANNED_ERRORS` ("prompt_too_long", "request_refused", "malformed_answer": that prompt's row;
"transient": the task retries; "engine_failure": the task fails), so a test can make one prompt or batch fail.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from autoif.llm import Usage, count
from autoif.llm.errors import (
    LLMContextOverflowError,
    LLMError,
    LLMRefusedError,
    LLMRequestError,
    LLMResponseError,
    LLMSetupError,
    LLMTransientError,
    MissingScriptError,
)

__all__ = ["ScriptedLLM", "MissingScriptError", "CANNED_ERRORS", "prompt_key"]

# A record's "error": the exception its prompt raises, as a real engine would raise it.
CANNED_ERRORS: dict[str, type[LLMError]] = {
    "prompt_too_long": LLMContextOverflowError,
    "request_refused": LLMRefusedError,
    "malformed_answer": LLMResponseError,
    "transient": LLMTransientError,
    "engine_failure": LLMError,
}


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


class ScriptedLLM:
    def __init__(self, by_key: Mapping[str, Sequence[str]], name: str = "scripted", errors: Mapping[str, str] | None = None) -> None:
        self._script = {k: list(v) for k, v in by_key.items()}  # prompt sha256 -> canned outputs
        self._errors = dict(errors or {})  # prompt sha256 -> a CANNED_ERRORS key
        self.name = name
        self.usage = Usage()
        self.calls: Counter[str] = Counter()  # per prompt key: how often asked

    @classmethod
    def from_prompts(cls, script: Mapping[str, Sequence[str]], name: str = "scripted") -> "ScriptedLLM":
        return cls({prompt_key(p): list(v) for p, v in script.items()}, name=name)

    @classmethod
    def from_records(cls, records: Iterable[Mapping], name: str = "scripted") -> "ScriptedLLM":
        script: dict[str, list[str]] = {}
        errors: dict[str, str] = {}
        for i, rec in enumerate(records):
            key = rec.get("prompt_sha256") or (prompt_key(rec["prompt"]) if "prompt" in rec else None)
            if key is not None and "error" in rec:
                if rec["error"] not in CANNED_ERRORS:
                    raise LLMSetupError(f"{name}: record {i}: 'error' must be one of {sorted(CANNED_ERRORS)}, got {rec['error']!r}")
                errors[key] = rec["error"]
                continue
            outputs = rec.get("outputs")
            if key is None or not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
                raise LLMSetupError(f"{name}: record {i} needs 'prompt' (or 'prompt_sha256') and 'outputs' (list of str) or 'error'")
            script.setdefault(key, []).extend(outputs)
        return cls(script, name=name, errors=errors)

    @classmethod
    def from_file(cls, path: str | Path | None) -> "ScriptedLLM":
        if path is None:
            raise LLMSetupError("engine.scripted_path is required for engine.kind=scripted")
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise LLMSetupError(f"{p}: cannot read the scripted engine's file: {e.strerror or e}") from e
        try:
            records = json.loads(text) if p.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise LLMSetupError(f"{p}: not valid JSON/JSONL: {e}") from e
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise LLMSetupError(f"{p}: expected a list of records (JSON) or one record per line (JSONL)")
        return cls.from_records(records, name=str(p))

    @property
    def identity(self) -> str:
        canned = sorted(self._script.items()) + ([["errors", sorted(self._errors.items())]] if self._errors else [])
        digest = hashlib.sha256(json.dumps(canned).encode()).hexdigest()[:12]
        return f"scripted:{digest}"

    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        temperature: float = 0.0,
        max_tokens: int = 512,
        seed: int | None = None,
        json_schema: dict | None = None,
    ) -> list[list[str]]:
        # Like the real engines, the whole batch runs before a prompt's fault is raised (with every prompt's
        # outcome attached), so generate_each need not ask again.
        count(self.usage, requests=len(prompts), prompts=len(prompts))
        out: list[list[str] | LLMRequestError] = []
        for i, prompt in enumerate(prompts):
            key = prompt_key(prompt)
            canned = self._script.get(key)
            if key in self._errors:
                self.calls[key] += 1
                kind = self._errors[key]
                count(self.usage, error=kind)
                error = CANNED_ERRORS[kind](f"{self.name}: canned {kind} for prompt sha256={key[:16]}… starting {prompt[:120]!r}")
                if not isinstance(error, LLMRequestError):
                    raise error  # engine-wide: the batch fails
                error.prompt_index = i
                out.append(error)
            elif not canned:
                raise MissingScriptError(f"{self.name}: no canned output for prompt sha256={key[:16]}… starting {prompt[:120]!r}")
            else:
                self.calls[key] += 1
                out.append([canned[j % len(canned)] for j in range(n)])
                count(self.usage, completions=n)
        failed = [o for o in out if isinstance(o, LLMRequestError)]
        if failed:
            failed[0].outcomes = out
            raise failed[0]
        return out  # type: ignore[return-value]  # no LLMRequestError in it

