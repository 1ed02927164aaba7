"""The one wrapper every AutoIF step goes through: a pure function of frames becomes a cached, retryable
Prefect task that reads its inputs from the store, validates and writes its output as versioned Parquet,
and logs its funnel to MLflow and to a Prefect table artifact.

A step function takes input frames (kept rows only) by name, plus ``cfg`` (its config section), ``llm``
and ``seed`` when it asks for them, and returns one frame holding kept rows (``reason`` null) and dropped
rows (``reason`` says why).

Cache key of a step = hash(step name, the function's source, its config section, the digests of its input
datasets, the LLM identity when it calls the LLM, run name, seed). The same key is Prefect's cache key and
the store path ``<root>/<run>/<step>/<key>/``, so a re-run with identical inputs makes no LLM call, and a
changed threshold recomputes that step and what follows, nothing upstream.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import datetime as dt
import hashlib
import inspect
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pandas as pd
from pydantic import BaseModel

from autoif.config import RunConfig
from autoif.store import Manifest, StepRef, Store
from autoif.tracking import Funnel, Tracker, funnel_markdown, log_funnel_plot

log = logging.getLogger("autoif")


@dataclass
class RunContext:
    """What the tasks of one flow run share: config, store, tracker, the parent MLflow run, the engine."""

    cfg: RunConfig
    store: Store
    tracker: Tracker
    parent_run_id: str
    llm_override: Any = None
    funnels: list[Funnel] = field(default_factory=list)
    started_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())
    _llm: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def llm(self):
        """Built on first use only: a fully cached run never loads a model."""
        with self._lock:
            if self._llm is None:
                if self.llm_override is not None:
                    self._llm = self.llm_override
                else:
                    from autoif.llm import make_llm

                    self._llm = make_llm(self.cfg.engine)
            return self._llm

    def llm_identity(self) -> str:
        if self.llm_override is not None:
            return self.llm_override.identity
        e = self.cfg.engine
        return f"{e.kind.value}:{e.base_url or ''}:{e.model}:{e.model_path or ''}:{e.scripted_path or ''}:{e.chat}"


_current: RunContext | None = None


def current() -> RunContext:
    if _current is None:
        raise RuntimeError("no AutoIF run context: call steps inside `with pipeline(cfg, ...)` in a flow")
    return _current


@contextlib.contextmanager
def pipeline(cfg: RunConfig, flow_name: str, llm=None) -> Iterator[RunContext]:
    """Open the store, the MLflow parent run (tagged with the Prefect flow run), and the run context."""
    global _current
    from prefect.runtime import flow_run

    tracker = Tracker(cfg.tracking)
    flow_run_id = flow_run.get_id()
    url = flow_run.get_flow_run_ui_url() if flow_run_id else None
    outer = _current
    parent = tracker.start_pipeline_run(flow_name, cfg, flow_run_id, url, parent_run_id=outer.parent_run_id if outer else None)
    if outer is not None and llm is None and outer.cfg.engine == cfg.engine:
        llm = outer.llm_override or outer._llm  # a subflow shares the engine (one model load per process)
    ctx = RunContext(cfg=cfg, store=Store.from_config(cfg.store), tracker=tracker, parent_run_id=parent, llm_override=llm)
    _current = ctx
    status = "FAILED"
    before = ctx.llm_override.usage.as_metrics() if ctx.llm_override is not None else {}
    try:
        yield ctx
        status = "FINISHED"
    finally:
        _current = outer
        from mlflow.entities import Metric

        # LLM usage of this flow run (0 requests when every step came from the cache)
        after = ctx._llm.usage.as_metrics() if ctx._llm is not None else {}
        usage = {k: v - before.get(k, 0.0) for k, v in after.items()} or {"llm_requests": 0.0}
        tracker.client.log_batch(parent, metrics=[Metric(k, v, 0, 0) for k, v in usage.items()])
        if ctx.funnels:
            tracker.client.log_text(parent, funnel_markdown(ctx.funnels), "funnel.md")
            log_funnel_plot(tracker.client, parent, ctx.funnels)
            _artifact_markdown(f"{cfg.run_name}-{flow_name}-funnel", funnel_markdown(ctx.funnels), f"AutoIF funnel of run {cfg.run_name}")
        tracker.end_run(parent, status)


def log_survival(first: StepRef, last: StepRef, group: str = "family") -> dict[str, float]:
    """Survival per group (e.g. seed family) from ``first`` to ``last``, on the flow's MLflow run as
    ``survival.<group>.<value>``. Reads the ``<group>.<value>.kept`` counts the two steps logged; no data."""
    from mlflow.entities import Metric

    ctx = current()
    counts = [(ctx.store.manifest(r.run, r.step, r.key).meta.get("metrics") or {}) for r in (first, last)]
    head, tail = f"{group}.", ".kept"
    values = {
        f"survival.{k[len(head):-len(tail)]}": counts[1].get(k, 0.0) / v
        for k, v in counts[0].items() if k.startswith(head) and k.endswith(tail) and v > 0
    }
    if values:
        ctx.tracker.client.log_batch(ctx.parent_run_id, metrics=[Metric(k, v, 0, 0) for k, v in values.items()])
    return values


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_transient(task, task_run, state) -> bool:
    """Retry only what may succeed on a second try: HTTP 429/5xx/timeouts, connection and storage I/O errors."""
    import httpx

    from autoif.llm.openai_http import LLMTransientError

    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (LLMTransientError, httpx.TransportError, TimeoutError, ConnectionError))


def _kept(df: pd.DataFrame) -> pd.DataFrame:
    if "reason" not in df:
        return df
    return df[df["reason"].isna()].reset_index(drop=True)


def step(
    name: str,
    *,
    schema=None,
    config: str | None = None,
    uses_llm: bool = False,
    key_extra: Callable[[RunConfig], Any] | None = None,
    key_fields: tuple[str, ...] | None = None,
    metrics: Callable[[pd.DataFrame], dict[str, float]] | None = None,
    metrics_final: Callable[[dict[str, float]], dict[str, float]] | None = None,
    stream: tuple[str, ...] = (),
    funnel_input: str | None = None,
    retries: int = 2,
    retry_delay_seconds: float = 5,
):
    """Turn ``fn(**frames, cfg=?, llm=?, seed=?) -> DataFrame`` into the Prefect task of step ``name``.

    Large data: inputs named in ``stream`` arrive as iterators of kept-row frames (read part by part from the
    store) instead of one frame, and ``fn`` may return an iterator of frames, each written as one Parquet part
    as it comes, so memory holds one batch, not the whole step. For an iterator output ``metrics`` is called
    per part and must return additive values (counts, sums, histogram bins); the wrapper sums them and
    ``metrics_final`` (optional) derives ratios from the totals. ``funnel_input`` names the input whose rows
    count as the funnel's ``rows_in`` (default: all inputs). ``key_fields`` limits the config fields in the
    cache key to those the step reads, when it shares a config section with another step."""
    from prefect import task

    def deco(fn: Callable[..., pd.DataFrame]):
        params = inspect.signature(fn).parameters
        # the whole module's source: a change in a helper the step calls (a parser, a prompt) invalidates it too
        source = hashlib.sha256(inspect.getsource(inspect.getmodule(fn)).encode()).hexdigest()[:16]

        def key_of(inputs: dict[str, StepRef]) -> str:
            ctx = current()
            section = getattr(ctx.cfg, config) if config else None
            return _hash({
                "step": name,
                "source": source,
                "config": section.model_dump(mode="json", include=set(key_fields) if key_fields else None)
                if isinstance(section, BaseModel) else None,
                "inputs": {k: r.digest for k, r in sorted(inputs.items())},
                "llm": ctx.llm_identity() if uses_llm else None,
                "extra": key_extra(ctx.cfg) if key_extra else None,
                "run": ctx.cfg.run_name,
                "seed": ctx.cfg.seed,
            })

        @task(
            name=name,
            task_run_name=name,
            retries=retries,
            retry_delay_seconds=retry_delay_seconds,
            retry_condition_fn=is_transient,
            cache_key_fn=lambda _ctx, p: f"autoif-{name}-{key_of(p.get('inputs') or {})}",
            persist_result=True,
        )
        def run_step(inputs: dict[str, StepRef]) -> StepRef:
            ctx = current()
            key = key_of(inputs)
            found = ctx.store.manifest(ctx.cfg.run_name, name, key)
            if found is not None:  # done earlier (Prefect's cache was cleared, or a retried flow run)
                log.info("step %s: reusing %s", name, found.uri)
                return _ref(found)
            seen: dict[str, int] = {}
            kwargs: dict[str, Any] = {}
            for k, r in inputs.items():
                kwargs[k] = _counted(ctx.store.iter_step(r), k, seen) if k in stream else _count(_kept(ctx.store.read_step(r)[0]), k, seen)
            if "cfg" in params:
                kwargs["cfg"] = getattr(ctx.cfg, config) if config else ctx.cfg
            if "llm" in params:
                kwargs["llm"] = ctx.llm
            if "seed" in params:
                kwargs["seed"] = ctx.cfg.seed
            token = _running_step.set((name, key))
            try:
                out = fn(**kwargs)
                upstream = [r.uri for r in inputs.values()]
                if isinstance(out, pd.DataFrame):
                    funnel = Funnel.of(name, _rows_in(seen, funnel_input), out)
                    meta = {"funnel": funnel.model_dump(), "metrics": metrics(out) if metrics else {}}
                    m = ctx.store.write_step(out, ctx.cfg.run_name, name, key, schema=schema, upstream=upstream, meta=meta)
                    return _ref(m)
                acc = _Accumulator(name, metrics)
                m = ctx.store.write_step(acc.watch(out), ctx.cfg.run_name, name, key, schema=schema, upstream=upstream,
                                         meta=lambda: acc.meta(_rows_in(seen, funnel_input), metrics_final))
                return _ref(m)
            finally:
                _running_step.reset(token)

        return Step(name=name, pure=fn, task=run_step)

    return deco


# (step name, step key) of the step task running in this thread: what batch task runs are keyed by
_running_step: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("autoif_step", default=None)


def map_batches(fn: Callable[..., pd.DataFrame], batches: Iterable[pd.DataFrame], **kwargs: Any) -> Iterator[pd.DataFrame]:
    """``fn(b, batch, **kwargs)`` for each batch, in order. Inside a step, each batch is its own Prefect task
    run named ``<step>[b]``, cached by the step's key, the batch number and the batch's content: when a step
    fails half-way, its re-run answers the finished batches from the cache and recomputes from the failed
    batch on. Outside a step (tests, notebooks) it is a plain loop."""
    from prefect.transactions import CommitMode, transaction

    running = _running_step.get()
    for b, batch in enumerate(batches):
        if running is None:
            yield fn(b, batch, **kwargs)
            continue
        name, key = running
        content = hashlib.sha256(batch.to_json(orient="split", date_format="iso").encode()).hexdigest()[:16]
        task = _batch_task().with_options(
            name=f"{name}-batch",
            task_run_name=f"{name}[{b}]",
            cache_key_fn=lambda _ctx, _p, k=f"autoif-{name}-{key}-b{b}-{content}": k,
        )
        # its own eagerly committed transaction: a finished batch stays cached when a later batch fails
        # (inside the step's transaction Prefect would roll it back with the failed step)
        with transaction(commit_mode=CommitMode.EAGER):
            out = task(fn, b, batch, kwargs)
        yield out


def _run_batch(fn: Callable[..., pd.DataFrame], b: int, batch: pd.DataFrame, kwargs: dict[str, Any]) -> pd.DataFrame:
    return fn(b, batch, **kwargs)


@functools.cache
def _batch_task():
    from prefect import task

    # results live in result storage, not in memory: a 20k-instruction step holds one batch at a time
    return task(_run_batch, persist_result=True, cache_result_in_memory=False)


def _count(frame: pd.DataFrame, name: str, seen: dict[str, int]) -> pd.DataFrame:
    seen[name] = seen.get(name, 0) + len(frame)
    return frame


def _counted(frames: Iterable[pd.DataFrame], name: str, seen: dict[str, int]) -> Iterator[pd.DataFrame]:
    """Kept rows of a streamed input, counted as they pass (the funnel's rows_in)."""
    seen.setdefault(name, 0)
    for frame in frames:
        frame = _kept(frame)
        if len(frame):
            yield _count(frame, name, seen)


def _rows_in(seen: dict[str, int], funnel_input: str | None) -> int:
    return seen.get(funnel_input, 0) if funnel_input else sum(seen.values())


class _Accumulator:
    """Funnel counts and additive metrics of a step whose output arrives as an iterator of parts."""

    def __init__(self, name: str, metrics: Callable[[pd.DataFrame], dict[str, float]] | None) -> None:
        self.name, self.metrics = name, metrics
        self.kept = 0
        self.reasons: dict[str, int] = {}
        self.totals: dict[str, float] = {}
        self.parts = 0

    def watch(self, frames: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for frame in frames:
            part = Funnel.of(self.name, 0, frame)
            self.kept += part.rows_out
            for r, c in part.reasons.items():
                self.reasons[r] = self.reasons.get(r, 0) + c
            for k, v in (self.metrics(frame) if self.metrics else {}).items():
                self.totals[k] = self.totals.get(k, 0.0) + float(v)
            self.parts += 1
            log.info("step %s: part %d written (%d rows, %d kept so far)", self.name, self.parts, len(frame), self.kept)
            yield frame

    def meta(self, rows_in: int, final: Callable[[dict[str, float]], dict[str, float]] | None) -> dict:
        funnel = Funnel(step=self.name, rows_in=rows_in, rows_out=self.kept, reasons=self.reasons)
        values = {**self.totals, **(final(self.totals) if final else {})}
        return {"funnel": funnel.model_dump(), "metrics": values}


@dataclass
class Step:
    """A step as the flow sees it: ``ref = step(input_name=ref, ...)``. ``task`` is the Prefect task (cached,
    retryable); the call records the funnel in MLflow and as a Prefect artifact from the flow, also when
    Prefect answered from its cache. ``pure`` is the plain data-in/data-out function."""

    name: str
    pure: Callable[..., pd.DataFrame]
    task: Any

    def __call__(self, **inputs: StepRef) -> StepRef:
        ref = self.task(inputs=inputs)
        ctx = current()
        m = ctx.store.manifest(ref.run, ref.step, ref.key)
        if m is None:
            raise RuntimeError(f"step {self.name}: task returned {ref.uri} but it has no manifest")
        _record(ctx, m)
        return ref


def _ref(m: Manifest) -> StepRef:
    return StepRef(**m.model_dump(include=set(StepRef.model_fields)))


def _record(ctx: RunContext, m: Manifest) -> None:
    funnel = Funnel(**m.meta["funnel"])
    reused = m.created_at < ctx.started_at  # written by an earlier flow run: Prefect or store cache hit
    ctx.funnels.append(funnel)
    sample = next(iter(ctx.store.iter_step(m, batch_rows=200)), None)
    ctx.tracker.log_step(ctx.parent_run_id, m, sample, funnel, _section(ctx, m.step), reused=reused,
                         metrics=m.meta.get("metrics") or {})
    _artifact_table(
        f"{ctx.cfg.run_name}-{m.step}",
        [{"step": m.step, "rows_in": funnel.rows_in, "kept": funnel.rows_out, "dropped": funnel.dropped, "reason": r, "count": c}
         for r, c in (funnel.reasons.items() or [("-", 0)])],
        f"{m.step}: {funnel.rows_out} kept of {funnel.rows_in} in; output {m.uri}" + (" (reused)" if reused else ""),
    )


def _section(ctx: RunContext, step: str) -> BaseModel | None:
    value = getattr(ctx.cfg, step, None)
    return value if isinstance(value, BaseModel) else None


def _artifact_key(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100] or "autoif"


def _artifact_table(key: str, rows: list[dict], description: str) -> None:
    from prefect.artifacts import create_table_artifact
    from prefect.context import TaskRunContext, FlowRunContext

    if TaskRunContext.get() or FlowRunContext.get():
        create_table_artifact(table=rows, key=_artifact_key(key), description=description)


def _artifact_markdown(key: str, md: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get():
        create_markdown_artifact(markdown=md, key=_artifact_key(key), description=description)
