"""What a step is, as data: the plain task function, its contract, its config section and how it is keyed.

A :class:`StepSpec` imports nothing of Prefect, the store or MLflow: it is the declaration that the flows'
step table (``autoif.flows.steps``) makes for each task function, and what travels with a step's task runs
to whichever process runs them (it pickles by reference to module-level functions).

Two shapes:
- a whole step: ``fn(**input_frames, cfg=?, llm=?, seed=?, ...) -> DataFrame`` (kept rows have a null
  ``reason``; dropped rows say why);
- a batched step: ``batches(**inputs, cfg) -> Iterator[DataFrame]`` cuts the (streamed) inputs, and
  ``fn(batch, cfg=?, llm=?, sandbox=?, seed=?, batch_index=?) -> DataFrame`` makes one output part per batch.

The cache key of a step hashes its own code (the modules of its functions and the task helpers they import,
not its neighbours'), its config section, its inputs' digests, the engine identity when it calls an LLM,
its fixed ``params``, the run name and the seed.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import pandas as pd
from pydantic import BaseModel

from autoif.config import EngineConfig, RunConfig

# the packages whose modules count as a step's own code when a step's functions import them
CODE_PACKAGES = ("autoif.tasks", "autoif.evaluation")


@dataclass(frozen=True, eq=False)
class StepSpec:
    name: str
    fn: Callable[..., pd.DataFrame]
    schema: Any = None  # Pandera DataFrameModel of the output
    config: str | None = None  # the RunConfig section passed as ``cfg`` (None: the whole RunConfig)
    key_fields: tuple[str, ...] | None = None  # the config fields in the key, when not the whole section
    key_extra: Callable[[RunConfig], Any] | None = None  # more key material (e.g. an input file's digest)
    params: Mapping[str, Any] = field(default_factory=dict)  # fixed keyword arguments, part of the key
    engine: str | EngineConfig = "engine"  # the RunConfig field naming the engine ``llm`` is built from
    metrics: Callable[[pd.DataFrame], dict[str, float]] | None = None  # additive, per output part
    metrics_final: Callable[[dict[str, float]], dict[str, float]] | None = None  # ratios from the totals
    batches: Callable[..., Iterator[pd.DataFrame]] | None = None  # set: a batched step
    empty: Callable[[], pd.DataFrame] | None = None  # a batched step's output when there is no batch
    batch_group: str | None = None  # batches hold whole groups of this input column (progress counts them)
    stream: tuple[str, ...] = ()  # inputs read part by part (batched steps: all inputs are streamed)
    with_dropped: tuple[str, ...] = ()  # inputs passed with their dropped rows too (e.g. failed responses for DPO)
    funnel_input: str | None = None  # the input whose rows are the funnel's rows_in (default: all)
    # a training step: it logs into its own MLflow run while it runs (TRL's callback, ``report_to``), opened
    # by the flow before the task and finished after it with its datasets and logged model
    tracked: bool = False
    retries: int = 2
    retry_delay_seconds: float = 5

    @property
    def batched(self) -> bool:
        return self.batches is not None

    def wants(self, name: str) -> bool:
        return name in inspect.signature(self.fn).parameters

    @property
    def uses_llm(self) -> bool:
        return self.wants("llm")

    def engine_config(self, cfg: RunConfig) -> EngineConfig:
        return self.engine if isinstance(self.engine, EngineConfig) else getattr(cfg, self.engine)

    def section(self, cfg: RunConfig) -> Any:
        return getattr(cfg, self.config) if self.config else cfg

    def code_digest(self) -> str:
        modules = {f.__module__ for f in (self.fn, self.batches, self.empty) if f is not None}
        return hashlib.sha256("".join(code_closure_digest(m) for m in sorted(modules)).encode()).hexdigest()[:16]

    def key(self, cfg: RunConfig, input_digests: Mapping[str, str], engine_identity: str | None) -> str:
        section = getattr(cfg, self.config) if self.config else None
        include = set(self.key_fields) if self.key_fields else None
        return stable_hash({
            "step": self.name,
            "code": self.code_digest(),
            "config": section.model_dump(mode="json", include=include) if isinstance(section, BaseModel) else None,
            "inputs": dict(sorted(input_digests.items())),
            "llm": engine_identity if self.uses_llm else None,
            "extra": self.key_extra(cfg) if self.key_extra else None,
            "params": {k: _jsonable(v) for k, v in sorted(self.params.items())},
            "run": cfg.run_name,
            "seed": cfg.seed,
        })


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _jsonable(v: Any) -> Any:
    return v.model_dump(mode="json") if isinstance(v, BaseModel) else v


def module_source(module: str) -> str:
    """The source text of a module (what a step's key hashes; tests replace it to simulate an edit)."""
    found = importlib.util.find_spec(module)
    if found is None or not found.origin or not found.origin.endswith(".py"):
        return ""
    with open(found.origin, encoding="utf-8") as f:
        return f.read()


def _imported_code_modules(module: str, source: str) -> set[str]:
    """The modules of :data:`CODE_PACKAGES` that ``module`` imports (absolute or relative)."""
    out: set[str] = set()
    package = module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y, inside package `package`
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith(CODE_PACKAGES) and _is_module(name):
                out.add(name)
    return out


def _is_module(name: str) -> bool:
    """``autoif.tasks.batching`` is a module; ``autoif.tasks.batching.row_batches`` (a name in it) is not."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):
        return False


def code_closure_digest(module: str) -> str:
    """Digest of ``module``'s source and of every step-code module it imports, transitively."""
    seen: dict[str, str] = {}
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        src = module_source(m)
        seen[m] = hashlib.sha256(src.encode()).hexdigest()
        try:
            todo.extend(_imported_code_modules(m, src))
        except SyntaxError:
            continue  # the digest of the text still changes with it
    return stable_hash(seen)

