"""Shared JSON repair for LLM output: find the JSON part of a completion and parse it, repairing the faults
models make. Used by verifier synthesis, back-translation and the consistency judge."""
from __future__ import annotations

import ast
import json
import re
from typing import Any

FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_-]*)[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_PY_LITERAL = re.compile(r"(?<=[:\[,])(\s*)(True|False|None)(?=\s*[,}\]])")
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)  # a backslash and the character it escapes, consumed in pairs
_JSON_ESCAPES = set('"\\/bfnrtu')


def extract_json_text(text: str) -> tuple[str | None, list[str]]:
    """The JSON part of a completion: a ```json fence (an unclosed one runs to the end), another fence that
    holds an object, or the outermost ``{...}`` of the text."""
    blocks = [(lang.lower(), body.strip()) for lang, body in FENCE.findall(text)]
    for lang, body in blocks:
        if lang == "json" and body:
            return body, []
    for lang, body in blocks:
        if body.startswith("{"):
            return body, ["fence_not_json"]
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        return text[start : end + 1], ([] if not text[:start].strip() and not text[end + 1 :].strip() else ["unfenced"])
    return None, []


def loads_repaired(blob: str) -> tuple[Any, list[str]]:
    """``json.loads`` plus repairs of the faults models make: raw newlines in strings, invalid escapes such as
    ``\\'`` (the backslash is kept, escaped), trailing commas, Python ``True/False/None``, a Python dict literal
    (parsed with ``ast.literal_eval``, which runs no code). Raises ValueError when nothing parses."""
    escaped = _ESCAPE.sub(lambda m: m.group(0) if m.group(1) in _JSON_ESCAPES else "\\\\" + m.group(1), blob)
    attempts = [
        ([], lambda: json.loads(blob)),
        (["control_chars"], lambda: json.loads(blob, strict=False)),
        (["invalid_escape"], lambda: json.loads(escaped, strict=False)),
        (["trailing_comma_or_python_literal"], lambda: json.loads(_PY_LITERAL.sub(
            lambda m: m.group(1) + {"True": "true", "False": "false", "None": "null"}[m.group(2)],
            _TRAILING_COMMA.sub(r"\1", escaped)), strict=False)),
        (["python_literal"], lambda: ast.literal_eval(blob)),
    ]
    for repairs, attempt in attempts:
        try:
            return attempt(), repairs
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # JSONDecodeError is a ValueError
            continue
    raise ValueError("not JSON, even after repairs")



def outer_braces(text: str) -> str | None:
    """The outermost ``{...}`` of a text: the JSON when a fence inside a JSON string (a test case that
    mentions a code fence) cut the fenced block short."""
    start, end = text.find("{"), text.rfind("}")
    return text[start : end + 1] if start != -1 and end > start else None


def json_object(text: str | None) -> dict | None:
    """The JSON object in a completion (fenced or not, repaired), or None when there is none."""
    if not isinstance(text, str):
        return None
    blob, _ = extract_json_text(text)
    if blob is None:
        return None
    try:
        obj, _ = loads_repaired(blob)
    except ValueError:
        whole = outer_braces(text)
        try:
            obj, _ = loads_repaired(whole) if whole and whole != blob else (None, [])
        except ValueError:
            return None
    return obj if isinstance(obj, dict) else None
