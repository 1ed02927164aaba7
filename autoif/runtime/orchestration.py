"""Steps as Prefect tasks: the one place where a :class:`StepSpec` becomes cached, retryable task runs.

- A whole step is one task run named after the step.
- A batched step is one task run per batch (``verifier_synthesis[3]``), submitted to the flow's task runner
  with at most ``runtime.max_batches_in_flight`` in flight, each writing its own Parquet part and returning a
  small :class:`BatchResult`; then one commit task run (named after the step) writes the manifest over the
  parts in batch order, so the output is the same on any runner and at any parallelism.

Prefect's cache key of every task run is the step key (plus the batch number), the same key as the store
path: a re-run makes no task do its work twice, and a cleared Prefect cache still finds the store's
manifest or part. Only transient failures (engine retries exhausted, connection and storage I/O errors) are
retried by Prefect.
"""
from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

from autoif.config import RunConfig, RuntimeConfig, TaskRunnerKind
from autoif.runtime import execute
from autoif.runtime.execute import BatchResult
from autoif.runtime.resources import engine_identity
from autoif.runtime.spec import StepSpec, stable_hash
from autoif.store import StepRef

if TYPE_CHECKING:
    from autoif.runtime.recording import PipelineRun

log = logging.getLogger("autoif")
progress_log = logging.getLogger("autoif.progress")


class StepFailed(RuntimeError):
    """A step (or one of its batches) failed; ``step`` and ``batch`` say where, ``__cause__`` why."""

    def __init__(self, step: str, cause: BaseException, batch: int | None = None) -> None:
        self.step, self.batch, self.cause = step, batch, cause
        where = f"step {step}" + (f", batch {batch}" if batch is not None else "")
        super().__init__(f"{where}: {type(cause).__name__}: {cause}")


def is_transient(task, task_run, state) -> bool:
    """Retry only what may succeed on a second try: engine retries exhausted (HTTP 429/5xx, timeouts),
    connection and storage I/O errors."""
    import httpx

    from autoif.llm import LLMTransientError

    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (LLMTransientError, httpx.TransportError, TimeoutError, ConnectionError))


def emit(event: str, **fields: Any) -> None:
    """A progress event (``autoif.progress`` logger, the record's ``progress`` attribute): the CLI renders it."""
    progress_log.info("%s %s", event, fields.get("step", ""), extra={"progress": {"event": event, **fields}})


# --- the Prefect tasks ------------------------------------------------------------------------------------


@functools.cache
def _prefect_tasks(spec: StepSpec):
    """(whole-step or commit task, batch task) of a spec; built once per spec and process."""
    from prefect import task

    common = dict(retries=spec.retries, retry_delay_seconds=spec.retry_delay_seconds, retry_condition_fn=is_transient,
                  persist_result=True)
    if spec.batched:
        head = task(execute.commit_batches, name=spec.name, task_run_name=spec.name, cache_key_fn=_cache_key, **common)
        batch = task(execute.run_batch, name=f"{spec.name}-batch", task_run_name=spec.name + "[{batch_index}]",
                     cache_key_fn=_cache_key, **common)
        return head, batch
    head = task(execute.run_whole_step, name=spec.name, task_run_name=spec.name, cache_key_fn=_cache_key, **common)
    return head, None


def _cache_key(_context, p: dict) -> str:
    """Prefect's cache key: the step key (the store path), the batch, and the store it lives in (two stores
    with one config are two caches)."""
    store = stable_hash(p["cfg"].store.root)
    batch = f"-b{p['batch_index']}" if "batch_index" in p else ""
    return f"autoif-{p['spec'].name}-{p['key']}{batch}-{store}"


def result_storage(cfg: RunConfig):
    """Where Prefect persists task results: ``runtime.result_storage``, else ``<store>/_prefect_results``
    when the store is on S3 (remote workers share it), else Prefect's local default (None)."""
    base = cfg.runtime.result_storage
    if base is None and cfg.store.root.startswith("s3://"):
        base = cfg.store.root.rstrip("/") + "/_prefect_results"
    if base is None:
        return None
    from prefect.settings import get_current_settings

    return _saved_result_storage(str(get_current_settings().api.url), base, cfg.store.s3_endpoint_url)


@functools.cache
def _saved_result_storage(api_url: str, base: str, endpoint_url: str | None):
    """The result-storage block for ``base``, saved once per Prefect API and location (Prefect wants it saved
    server-side: workers load it by reference), not once per step."""
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    if "://" not in base:
        block = LocalFileSystem(basepath=base)
    else:
        settings = {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else {}
        block = RemoteFileSystem(basepath=base, settings=settings)
    block.save(f"autoif-results-{stable_hash([base, endpoint_url])}", overwrite=True)
    return block


def share_prefect_api() -> str:
    """Make sure worker processes talk to the flow's Prefect API: with no server configured, Prefect runs an
    ephemeral one inside this process's session, which spawned Dask/Ray workers cannot see (each would start
    its own, ~20 s, and record its task runs there). Start it now and export its URL to the environment the
    workers inherit; with a configured server (or the test harness's) export that one. Returns the URL."""
    import os

    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start()
        url = server.api_url
    os.environ["PREFECT_API_URL"] = str(url)
    return str(url)


def task_runner(cfg: RuntimeConfig):
    """The Prefect task runner ``runtime.task_runner`` names (a flow takes it through ``with_options``)."""
    if cfg.task_runner is not TaskRunnerKind.thread:
        share_prefect_api()
    if cfg.task_runner is TaskRunnerKind.thread:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max(cfg.workers, cfg.max_batches_in_flight) + 1)
    if cfg.task_runner is TaskRunnerKind.dask:
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as e:
            raise RuntimeError("runtime.task_runner=dask needs prefect-dask: pip install 'autoif-flow[dask]'") from e
        if cfg.address:
            return DaskTaskRunner(address=cfg.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.workers, "threads_per_worker": cfg.threads_per_worker,
                                              "processes": True, "dashboard_address": None})
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as e:
        raise RuntimeError("runtime.task_runner=ray needs prefect-ray: pip install 'autoif-flow[ray]'") from e
    return RayTaskRunner(address=cfg.address) if cfg.address else RayTaskRunner()


# --- a step as the flow calls it --------------------------------------------------------------------------


class Step:
    """``ref = step(run, input_name=ref, ...)`` in a flow; ``step.pure(...)`` is the plain function call."""

    def __init__(self, spec: StepSpec) -> None:
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    def pure(self, cfg: Any = None, **inputs: Any):
        """The step's function(s) called directly in this process, no Prefect, no store (tests)."""
        return execute.run_locally(self.spec, cfg, **inputs)

    def key(self, cfg: RunConfig, inputs: dict[str, StepRef]) -> str:
        identity = engine_identity(self.spec.engine_config(cfg)) if self.spec.uses_llm else None
        return self.spec.key(cfg, {k: r.digest for k, r in inputs.items()}, identity)

    def __call__(self, run: "PipelineRun", **inputs: StepRef) -> StepRef:
        spec, cfg = self.spec, run.cfg
        key = self.key(cfg, inputs)
        emit("step_start", step=spec.name, key=key)
        head, batch_task = _prefect_tasks(spec)
        # each task run names the store version it makes (filter task runs by tag in the Prefect UI)
        labels = {f"autoif.key:{key}", f"autoif.uri:{run.store.uri(cfg.run_name, spec.name, key)}"}
        head = head.with_options(tags=labels)
        batch_task = batch_task.with_options(tags=labels) if batch_task is not None else None
        storage = result_storage(cfg)
        if storage is not None:
            head = head.with_options(result_storage=storage)
            batch_task = batch_task.with_options(result_storage=storage) if batch_task is not None else None
        training_run = None  # a tracked step not yet in the store: the MLflow run it logs into while it trains
        if spec.tracked and run.store.manifest(cfg.run_name, spec.name, key) is None:
            training_run = run.open_training_run(spec.name, key)
        tracking = run.training_env(training_run) if training_run else None
        try:
            cached = False  # Prefect answered the step from its cache (its task run shows Cached)
            if batch_task is None:
                future = head.submit(spec=spec, cfg=cfg, inputs=inputs, key=key, tracking=tracking)
                ref = future.result()
                cached = future.state.name == "Cached"
                if run.store.manifest(ref.run, ref.step, ref.key) is None:  # Prefect cached it, the store lost it
                    log.warning("step %s: Prefect's cached result points at %s, which is gone: recomputing", spec.name, ref.uri)
                    if spec.tracked and training_run is None:
                        training_run = run.open_training_run(spec.name, key)
                        tracking = run.training_env(training_run)
                    ref = head.with_options(refresh_cache=True).submit(spec=spec, cfg=cfg, inputs=inputs, key=key,
                                                                       tracking=tracking).result()
                    cached = False
                done = run.store.manifest(ref.run, ref.step, ref.key)
                if done is not None and done.created_at >= run.started_at:  # computed in this flow run
                    run.add_usage(done.meta.get("usage") or {})
            else:
                ref, cached = self._batched(run, head, batch_task, inputs, key)
        except StepFailed:
            if training_run:
                run.tracker.end_run(training_run, "FAILED")
            raise
        except Exception as e:  # noqa: BLE001  whatever a task raised: named by step, the cause kept
            if training_run:
                run.tracker.end_run(training_run, "FAILED")
            raise StepFailed(spec.name, e) from e
        if spec.tracked:
            manifest = run.record_training(ref, section=spec.config, inputs=inputs, training_run=training_run,
                                           cached=cached)
        else:
            manifest = run.record(ref, section=spec.config, cached=cached, inputs=inputs)
        emit("step_done", step=spec.name, rows_in=manifest.meta["funnel"]["rows_in"],
             kept=manifest.meta["funnel"]["rows_out"], reused=cached or manifest.created_at < run.started_at, uri=ref.uri)
        return ref

    def _batched(self, run: "PipelineRun", head, batch_task, inputs: dict[str, StepRef], key: str) -> tuple[StepRef, bool]:
        """The batches, then the commit; (the step's ref, whether Prefect answered the commit from its cache)."""
        from prefect.futures import as_completed

        spec, cfg = self.spec, run.cfg
        store = run.store
        upstream = [r.uri for r in inputs.values()]
        if store.manifest(cfg.run_name, spec.name, key) is not None:
            future = head.submit(spec=spec, cfg=cfg, key=key, results=None, n_rows_in=0, upstream=upstream)
            return future.result(), future.state.name == "Cached"
        head = head.with_options(refresh_cache=True)  # no manifest: whatever Prefect cached for the commit is stale
        seen: dict[str, int] = {}
        streams = {k: execute.stream_kept(store, r, seen, k) for k, r in inputs.items()}
        total = _batch_count(store, spec, cfg, inputs)
        limit = cfg.runtime.max_batches_in_flight
        results: list[BatchResult] = []
        pending: list = []
        failure: tuple[int, BaseException] | None = None

        index: dict[int, int] = {}  # id(future) -> batch number
        batches_by_index: dict[int, object] = {}  # the batches in flight (to recompute one whose part is gone)

        def settle(future) -> None:
            nonlocal failure
            pending.remove(future)
            b = index.pop(id(future))
            try:
                r = future.result()
            except Exception as e:  # noqa: BLE001  kept and raised as StepFailed once the others settled
                failure = failure or (b, e)
                return
            if future.state.name == "Cached" and store.read_part(cfg.run_name, spec.name, key, b) is None:
                log.warning("step %s: batch %d cached by Prefect but its part is gone: recomputing", spec.name, b)
                r = batch_task.with_options(refresh_cache=True).submit(
                    spec=spec, cfg=cfg, key=key, batch_index=b, batch=batches_by_index.pop(b)).result()
            batches_by_index.pop(b, None)
            results.append(r)
            reused = r.reused or future.state.name == "Cached"  # done by an earlier flow run: no new usage
            if not reused:
                run.add_usage(r.usage)
            emit("batch_done", step=spec.name, batch=r.index, batches=total, done=len(results), rows=r.part.rows,
                 kept=r.kept, usage={} if reused else r.usage, sandbox_calls=0 if reused else r.sandbox_calls,
                 seconds=r.seconds, reused=reused)

        for b, batch in enumerate(spec.batches(**streams, cfg=spec.section(cfg))):
            if failure is not None:
                break
            future = batch_task.submit(spec=spec, cfg=cfg, key=key, batch_index=b, batch=batch)
            index[id(future)] = b
            batches_by_index[b] = batch
            pending.append(future)
            while len(pending) >= limit:
                settle(next(iter(as_completed(list(pending)))))
        while pending:
            settle(next(iter(as_completed(list(pending)))))
        if failure is not None:
            raise StepFailed(spec.name, failure[1], batch=failure[0]) from failure[1]
        n_in = execute.rows_in(seen, spec.funnel_input)
        return head.submit(spec=spec, cfg=cfg, key=key, results=results, n_rows_in=n_in, upstream=upstream).result(), False


def _batch_count(store, spec: StepSpec, cfg: RunConfig, inputs: dict[str, StepRef]) -> int | None:
    """How many batches a step will have: ``batch_size`` kept rows (or groups of ``batch_group``) of its one
    input per batch; None when that is not how it batches (progress then counts without a total)."""
    size = getattr(spec.section(cfg), "batch_size", None)
    if size is None or len(inputs) != 1:
        return None
    ref = next(iter(inputs.values()))
    frame = store.read_columns(ref, [c for c in (spec.batch_group, "reason") if c])
    kept = frame[frame["reason"].isna()] if "reason" in frame else frame
    units = kept[spec.batch_group].nunique() if spec.batch_group else len(kept)
    return max(1, -(-int(units) // size))
