"""The bodies of step task runs: what happens in whichever process runs a step or one of its batches.

Everything comes in as values (the step's spec, the run config, input references, the step key); the store
is rebuilt from the config and the resources (engine, sandbox, NLI model) are the process's own
(:mod:`autoif.runtime.resources`). Nothing here imports Prefect or MLflow: the Prefect tasks in
:mod:`autoif.runtime.orchestration` call these functions, and tests may call them directly.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import time
from typing import Any, Iterator

import pandas as pd
from pydantic import BaseModel

from autoif.config import RunConfig
from autoif.llm import Usage, usage_scope
from autoif.runtime import resources
from autoif.runtime.spec import StepSpec
from autoif.store import Manifest, Part, StepRef, Store
from autoif.tracking import Funnel

log = logging.getLogger("autoif")


class BatchResult(BaseModel):
    """What a finished batch returns (its rows live only in its Parquet part): counts, metrics, usage."""

    index: int
    part: Part
    kept: int
    reasons: dict[str, int]
    metrics: dict[str, float]
    usage: dict[str, float]  # this batch's LLM usage (llm_requests, llm_prompt_tokens, ...)
    sandbox_calls: int = 0
    seconds: float = 0.0
    reused: bool = False  # the part was on the store already (written before a crash)
    process: str = ""  # host:pid that ran it
    started_at: str | None = None  # UTC ISO time the batch started (None: reused)


def utc_now() -> str:
    """Now as a UTC ISO timestamp (the form manifests' ``created_at`` take)."""
    return dt.datetime.now(dt.timezone.utc).isoformat()


def kept_rows(df: pd.DataFrame) -> pd.DataFrame:
    if "reason" not in df:
        return df
    return df[df["reason"].isna()].reset_index(drop=True)


def stream_kept(store: Store, ref: StepRef, counter: dict[str, int], name: str) -> Iterator[pd.DataFrame]:
    """Kept rows of a finished step, part by part, counted as they pass (the funnel's rows_in)."""
    counter.setdefault(name, 0)
    for frame in store.iter_step(ref):
        frame = kept_rows(frame)
        if len(frame):
            counter[name] += len(frame)
            yield frame


def rows_in(counter: dict[str, int], funnel_input: str | None) -> int:
    return counter.get(funnel_input, 0) if funnel_input else sum(counter.values())


class _CountingSandbox:
    """The process's sandbox pool, counting the calls one batch makes through it."""

    def __init__(self, pool: Any) -> None:
        self.pool, self.calls = pool, 0

    def run(self, funcs, inputs, pairs=None):
        results = self.pool.run(funcs, inputs, pairs)
        self.calls += len(results)
        return results


def step_kwargs(spec: StepSpec, cfg: RunConfig, batch_index: int | None = None,
                tracking: dict[str, str] | None = None) -> dict[str, Any]:
    """The keyword arguments a step function asks for by name: its config section, resources, the seed, and
    ``report_to`` ("mlflow" when the flow opened an MLflow run for this task run, else "none")."""
    names = {n for n in ("cfg", "llm", "sandbox", "nli", "seed", "batch_index") if spec.wants(n)}
    section = spec.section(cfg)
    kwargs: dict[str, Any] = resources.for_step(names, spec.engine_config(cfg), section)
    if "cfg" in names:
        kwargs["cfg"] = section
    if "seed" in names:
        kwargs["seed"] = cfg.seed
    if "batch_index" in names:
        kwargs["batch_index"] = batch_index or 0
    if "sandbox" in kwargs:
        kwargs["sandbox"] = _CountingSandbox(kwargs["sandbox"])
    if spec.wants("report_to"):
        kwargs["report_to"] = "mlflow" if tracking else "none"
    kwargs.update(spec.params)
    return kwargs


def usage_metrics(u: Usage) -> dict[str, float]:
    return {k: v for k, v in u.as_metrics().items() if v}


@contextlib.contextmanager
def environment(values: dict[str, str] | None) -> Iterator[None]:
    """``values`` in ``os.environ`` for the block (a tracked step's MLflow run, for the library that logs)."""
    if not values:
        yield
        return
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_whole_step(spec: StepSpec, cfg: RunConfig, inputs: dict[str, StepRef], key: str,
                   tracking: dict[str, str] | None = None) -> StepRef:
    """A whole (non-batched) step: read its inputs, call its function, write its output and manifest.
    ``tracking``: the environment of the MLflow run the flow opened for a tracked step (not part of the key)."""
    store = Store.from_config(cfg.store)
    found = store.manifest(cfg.run_name, spec.name, key)
    if found is not None:  # done earlier (Prefect's cache was cleared, or a retried flow run)
        log.info("step %s: reusing %s", spec.name, found.uri)
        return as_ref(found)
    seen: dict[str, int] = {}
    kwargs = step_kwargs(spec, cfg, tracking=tracking)
    for name, ref in inputs.items():
        if name in spec.stream:
            kwargs[name] = stream_kept(store, ref, seen, name)
        else:
            frame = store.read_step(ref)[0]
            frame = frame if name in spec.with_dropped else kept_rows(frame)
            seen[name] = len(frame)
            kwargs[name] = frame
    started, started_at = time.monotonic(), utc_now()
    with usage_scope() as usage, environment(tracking):
        out = spec.fn(**kwargs)
    # a step without inputs (seeds) reads its rows from a file: they are its rows in
    funnel = Funnel.of(spec.name, rows_in(seen, spec.funnel_input) if inputs else len(out), out)
    meta = {"funnel": funnel.model_dump(), "metrics": spec.metrics(out) if spec.metrics else {},
            "usage": usage_metrics(usage), "seconds": round(time.monotonic() - started, 3), "started_at": started_at}
    m = store.write_step(out, cfg.run_name, spec.name, key, schema=spec.schema,
                         upstream=[r.uri for r in inputs.values()], meta=meta)
    return as_ref(m)


def run_batch(spec: StepSpec, cfg: RunConfig, key: str, batch_index: int, batch: pd.DataFrame) -> BatchResult:
    """One batch of a batched step: its output becomes Parquet part ``batch_index`` of the step (stored once,
    there); what comes back is small. A part already on the store (a batch that finished before a crash)
    is not computed again."""
    store = Store.from_config(cfg.store)
    earlier = store.read_part(cfg.run_name, spec.name, key, batch_index)
    if earlier is not None:
        frame, part = earlier
        return _result(spec, batch_index, part, frame, Usage(), 0, 0.0, reused=True)
    kwargs = step_kwargs(spec, cfg, batch_index)
    started, started_at = time.monotonic(), utc_now()
    with usage_scope() as usage:
        out = spec.fn(batch, **kwargs)
    part = store.write_part(out, cfg.run_name, spec.name, key, batch_index, schema=spec.schema)
    calls = kwargs["sandbox"].calls if "sandbox" in kwargs else 0
    r = _result(spec, batch_index, part, out, usage, calls, time.monotonic() - started)
    return r.model_copy(update={"started_at": started_at})


def _result(spec: StepSpec, index: int, part: Part, frame: pd.DataFrame, usage: Usage, calls: int, seconds: float,
            reused: bool = False) -> BatchResult:
    funnel = Funnel.of(spec.name, 0, frame)
    return BatchResult(index=index, part=part, kept=funnel.rows_out, reasons=funnel.reasons,
                       metrics={k: float(v) for k, v in (spec.metrics(frame) if spec.metrics else {}).items()},
                       usage=usage_metrics(usage), sandbox_calls=calls, seconds=round(seconds, 3), reused=reused,
                       process=f"{socket.gethostname()}:{os.getpid()}")


def commit_batches(spec: StepSpec, cfg: RunConfig, key: str, results: list[BatchResult] | None, n_rows_in: int,
                   upstream: list[str]) -> StepRef:
    """Write the manifest of a batched step over its parts in batch order (identical to a sequential run)."""
    store = Store.from_config(cfg.store)
    found = store.manifest(cfg.run_name, spec.name, key)
    if found is not None:
        return as_ref(found)
    results = sorted(results or [], key=lambda r: r.index)
    if not results:  # no batch at all: one empty part with the step's columns
        empty = spec.empty() if spec.empty is not None else pd.DataFrame({"reason": pd.Series([], dtype=object)})
        results = [_result(spec, 0, store.write_part(empty, cfg.run_name, spec.name, key, 0, schema=spec.schema),
                           empty, Usage(), 0, 0.0)]
    if [r.index for r in results] != list(range(len(results))):
        raise RuntimeError(f"step {spec.name}: batches {[r.index for r in results]} are not 0..{len(results) - 1}")
    totals: dict[str, float] = {}
    usage: dict[str, float] = {}
    reasons: dict[str, int] = {}
    for r in results:
        for k, v in r.metrics.items():
            totals[k] = totals.get(k, 0.0) + v
        for k, v in r.usage.items():
            usage[k] = usage.get(k, 0.0) + v
        for k, v in r.reasons.items():
            reasons[k] = reasons.get(k, 0) + v
    funnel = Funnel(step=spec.name, rows_in=n_rows_in, rows_out=sum(r.kept for r in results), reasons=reasons)
    meta = {"funnel": funnel.model_dump(),
            "metrics": {**totals, **(spec.metrics_final(totals) if spec.metrics_final else {})},
            "usage": usage, "sandbox_calls": sum(r.sandbox_calls for r in results),
            "seconds": round(sum(r.seconds for r in results), 3), "batches": len(results),
            "batches_reused": sum(r.reused for r in results), "processes": sorted({r.process for r in results}),
            "started_at": min((r.started_at for r in results if r.started_at), default=None)}
    m = store.commit([r.part for r in results], cfg.run_name, spec.name, key, upstream=upstream, meta=meta)
    return as_ref(m)


def run_locally(spec: StepSpec, cfg: Any, **inputs: Any) -> pd.DataFrame:
    """A step as a plain function call, in this process (tests, notebooks): ``inputs`` are frames (or
    iterables of frames for streamed inputs) plus any resource the function asks for (``llm``, ``sandbox``,
    ``nli``, ``seed``); ``cfg`` is the step's config section. A sandbox it asks for and is not given is the
    process's pool; a batched step runs its batches in order."""
    resource_names = ("llm", "sandbox", "nli", "seed")
    frames = {k: v for k, v in inputs.items() if k not in resource_names}
    extra = {k: v for k, v in inputs.items() if k in resource_names and spec.wants(k)}
    if spec.wants("sandbox") and "sandbox" not in extra:
        extra["sandbox"] = resources.sandbox(getattr(cfg, "sandbox_workers", None), getattr(cfg, "timeout_s", 1.0))
    if spec.wants("seed") and "seed" not in extra:
        extra["seed"] = 0
    given_cfg = {"cfg": cfg} if spec.wants("cfg") else {}
    if not spec.batched:
        return spec.fn(**frames, **extra, **given_cfg, **spec.params)
    streams = {k: ([v] if isinstance(v, pd.DataFrame) else v) for k, v in frames.items()}
    outs = []
    for b, batch in enumerate(spec.batches(**streams, cfg=cfg)):
        kwargs = {**extra, **given_cfg, **spec.params}
        if spec.wants("batch_index"):
            kwargs["batch_index"] = b
        outs.append(spec.fn(batch, **kwargs))
    if not outs:
        return spec.empty() if spec.empty is not None else pd.DataFrame()
    return pd.concat(outs, ignore_index=True)


def as_ref(m: Manifest) -> StepRef:
    return StepRef(**m.model_dump(include=set(StepRef.model_fields)))

