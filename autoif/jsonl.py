"""Reading JSONL input files (seeds, probes, benchmarks, responses) with errors that name file and line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


def iter_jsonl(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_number, object)`` for each non-empty line; a bad line raises ``error`` naming file and line."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
            yield i, obj
