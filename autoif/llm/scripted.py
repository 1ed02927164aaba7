"""Scripted engine: canned outputs keyed by prompt, so the whole DAG runs offline, deterministically.

File format (JSON or JSONL): records ``{"prompt": str, "outputs": [str, ...]}``. A prompt asked for ``n``
completions gets the first ``n`` outputs (cycled when fewer are canned). Matching is on the exact prompt
text; ``prompt_sha256`` may stand in for ``prompt`` in large files. A prompt with no canned output raises
:class:`MissingScriptError` naming the prompt's hash and head, so the test author knows what to add.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from autoif.llm import Usage


class MissingScriptError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


class ScriptedLLM:
    def __init__(self, by_key: Mapping[str, Sequence[str]], name: str = "scripted") -> None:
        self._script = {k: list(v) for k, v in by_key.items()}  # prompt sha256 -> canned outputs
        self.name = name
        self.usage = Usage()
        self.calls: Counter[str] = Counter()  # per prompt key: how often asked

    @classmethod
    def from_prompts(cls, script: Mapping[str, Sequence[str]], name: str = "scripted") -> "ScriptedLLM":
        return cls({prompt_key(p): list(v) for p, v in script.items()}, name=name)

    @classmethod
    def from_records(cls, records: Iterable[Mapping], name: str = "scripted") -> "ScriptedLLM":
        script: dict[str, list[str]] = {}
        for i, rec in enumerate(records):
            key = rec.get("prompt_sha256") or (prompt_key(rec["prompt"]) if "prompt" in rec else None)
            outputs = rec.get("outputs")
            if key is None or not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
                raise ValueError(f"{name}: record {i} needs 'prompt' (or 'prompt_sha256') and 'outputs' (list of str)")
            script.setdefault(key, []).extend(outputs)
        return cls(script, name=name)

    @classmethod
    def from_file(cls, path: str | Path | None) -> "ScriptedLLM":
        if path is None:
            raise ValueError("engine.scripted_path is required for engine.kind=scripted")
        p = Path(path)
        text = p.read_text()
        try:
            records = json.loads(text) if p.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON/JSONL: {e}") from e
        return cls.from_records(records, name=str(p))

    @property
    def identity(self) -> str:
        digest = hashlib.sha256(json.dumps(sorted(self._script.items())).encode()).hexdigest()[:12]
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
        out = []
        for prompt in prompts:
            key = prompt_key(prompt)
            canned = self._script.get(key)
            if not canned:
                raise MissingScriptError(f"{self.name}: no canned output for prompt sha256={key[:16]}… starting {prompt[:120]!r}")
            self.calls[key] += 1
            out.append([canned[i % len(canned)] for i in range(n)])
        self.usage.requests += len(prompts)
        self.usage.prompts += len(prompts)
        self.usage.completions += n * len(prompts)
        return out

