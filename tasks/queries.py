"""Step 5, queries: the real user queries instructions are paired with (ShareGPT in the paper).

Sources: the built-in set (``autoif/data/queries.jsonl``, written for this project), a local JSONL / Parquet /
CSV file with a query column, ShareGPT conversations (the first human turn), or a Hugging Face ``datasets``
directory saved on disk. Every query read is a row; queries outside the length bounds and repeats are
dropped with a reason. A malformed row names the file, line and field.
"""
from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
from autoif.tasks.ids import normalise

from autoif.config import QueriesConfig, QuerySourceFormat
from autoif.jsonl import iter_jsonl

QUERY_COLUMNS = ["query_id", "query", "category", "source", "reason"]
_HUMAN = {"human", "user"}


class QueryFileError(ValueError):
    """A query source is malformed; the message names the file, line (or row) and field."""


def queries_path(cfg: QueriesConfig) -> Path:
    if cfg.path:
        return Path(cfg.path)
    return Path(str(resources.files("autoif") / "data" / "queries.jsonl"))


def queries_digest(cfg: QueriesConfig) -> str:
    """The source's content (a file, or every file of a datasets directory): what the step is keyed by."""
    path = queries_path(cfg)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def source_format(cfg: QueriesConfig) -> QuerySourceFormat:
    if cfg.format is not QuerySourceFormat.auto:
        return cfg.format
    path = queries_path(cfg)
    if path.is_dir():
        return QuerySourceFormat.hf_dataset
    return {".parquet": QuerySourceFormat.parquet, ".csv": QuerySourceFormat.csv}.get(path.suffix, QuerySourceFormat.jsonl)


def _first_human_turn(conv: Any) -> str | None:
    turns = conv.get("conversations") if isinstance(conv, dict) else None
    if not isinstance(turns, list):
        return None
    for t in turns:
        if isinstance(t, dict) and str(t.get("from", t.get("role", ""))).lower() in _HUMAN:
            value = t.get("value", t.get("content"))
            return value if isinstance(value, str) else None
    return None


def _read(cfg: QueriesConfig) -> Iterator[tuple[str, str, str | None]]:
    """(where, query, category) per record; ``where`` is ``file:line`` (or ``file:row``) for messages."""
    path, fmt, col = queries_path(cfg), source_format(cfg), cfg.column
    if not path.exists():
        raise QueryFileError(f"{path}: query source not found")
    if fmt is QuerySourceFormat.sharegpt:
        if path.suffix == ".json":
            try:
                records = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise QueryFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(records, list):
                raise QueryFileError(f"{path}: a ShareGPT file is a JSON list of conversations")
            items = ((f"{path}:record {i}", r) for i, r in enumerate(records))
        else:
            items = ((f"{path}:{i}", r) for i, r in iter_jsonl(path, QueryFileError))
        for where, rec in items:
            text = _first_human_turn(rec)
            if text is None:
                raise QueryFileError(f"{where}: field 'conversations' needs a human turn with a string 'value'")
            yield where, text, None
        return
    if fmt is QuerySourceFormat.jsonl:
        for i, rec in iter_jsonl(path, QueryFileError):
            if not isinstance(rec.get(col), str):
                raise QueryFileError(f"{path}:{i}: field {col!r} must be a string")
            cat = rec.get("category")
            yield f"{path}:{i}", rec[col], cat if isinstance(cat, str) else None
        return
    if fmt is QuerySourceFormat.hf_dataset:
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if hasattr(ds, "keys"):  # a DatasetDict: its first split (usually "train")
            ds = ds[next(iter(ds.keys()))]
        frame = ds.to_pandas()
    elif fmt is QuerySourceFormat.parquet:
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if col not in frame.columns:
        raise QueryFileError(f"{path}: no column {col!r} (columns: {', '.join(map(str, frame.columns))}); set queries.column")
    cats = frame["category"] if "category" in frame.columns else [None] * len(frame)
    for i, (q, cat) in enumerate(zip(frame[col], cats)):
        row = i + 2 if fmt is QuerySourceFormat.csv else i  # CSV: the file's line (after the header)
        if not isinstance(q, str):
            raise QueryFileError(f"{path}:{'line' if fmt is QuerySourceFormat.csv else 'row'} {row}: field {col!r} must be a string")
        yield f"{path}:{row}", q, cat if isinstance(cat, str) else None


def load_queries(cfg: QueriesConfig) -> pd.DataFrame:
    """Every query of the source; ``too_short`` / ``too_long`` (AutoIF: 20 < len < 300) and ``duplicate``
    ones dropped with the reason."""
    rows, seen = [], set()
    source = "builtin" if cfg.path is None else source_format(cfg).value
    for n, (_, text, cat) in enumerate(_read(cfg)):
        if cfg.max_queries is not None and n >= cfg.max_queries:
            break
        q = text.strip()
        qid = hashlib.sha256(normalise(q).encode()).hexdigest()[:16]
        reason = None
        if len(q) <= cfg.min_chars:
            reason = "too_short"
        elif len(q) >= cfg.max_chars:
            reason = "too_long"
        elif qid in seen:
            reason = "duplicate"
        if reason is None:
            seen.add(qid)
        rows.append({"query_id": qid if reason is None else f"{qid}-{n}", "query": q, "category": cat or "unknown",
                     "source": source, "reason": reason})
    return pd.DataFrame(rows, columns=QUERY_COLUMNS)
