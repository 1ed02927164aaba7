"""The side effects of a flow run, in one thin place: the MLflow parent run, a nested run per step (its config
section as params, funnel, metrics, usage, the output dataset), Prefect artifacts, the evaluation's
metrics and tables. Runs in the flow's process; step task runs never log here.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from pydantic import BaseModel

from autoif.config import RunConfig
from autoif.store import Manifest, StepRef, Store
from autoif.tracking import Funnel, Tracker, funnel_markdown, log_funnel_plot


@dataclass
class PipelineRun:
    """One flow run as its steps see it: the config (what task runs receive), the store, the MLflow parent
    run, and the funnels recorded so far. Passed explicitly to every step call; never a global."""

    cfg: RunConfig
    flow_name: str
    store: Store
    tracker: Tracker
    parent_run_id: str
    started_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())
    funnels: list[Funnel] = field(default_factory=list)
    usage: dict[str, float] = field(default_factory=dict)  # LLM usage of the work done in this flow run
    trained: dict[str, Any] = field(default_factory=dict)  # training step -> lineage.TrainingRecord (this flow run)
    training_runs: dict[str, str] = field(default_factory=dict)  # training step -> its MLflow run id

    def add_usage(self, usage: dict[str, float]) -> None:
        for k, v in usage.items():
            self.usage[k] = self.usage.get(k, 0.0) + float(v)

    def record(self, ref: StepRef, section: str | None, training_run: str | None = None, cached: bool = False,
               inputs: dict[str, StepRef] | None = None) -> Manifest:
        """Log a finished step (also one answered from a cache) to MLflow, with its config ``section`` as
        params, and as a Prefect table artifact; a training step's record names its training run. Reused:
        Prefect answered it from its cache (``cached``), or an earlier flow run wrote it."""
        m = self.store.manifest(ref.run, ref.step, ref.key)
        if m is None:
            raise RuntimeError(f"step {ref.step}: task returned {ref.uri} but it has no manifest")
        funnel = Funnel(**m.meta["funnel"])
        funnel.instructions = kept_instructions(self.store, m)
        reused = cached or m.created_at < self.started_at  # as Prefect's Cached, or written by an earlier flow run
        self.funnels.append(funnel)
        sample = next(iter(self.store.iter_step(m, batch_rows=200)), None)
        if sample is not None:  # weights and other bytes are no dataset preview
            sample = sample[[c for c in sample.columns if not sample[c].map(lambda v: isinstance(v, bytes)).any()]]
        params = getattr(self.cfg, section) if section else None
        metrics = {**(m.meta.get("metrics") or {}), **(m.meta.get("usage") or {})}
        if funnel.instructions is not None:
            metrics["instructions"] = funnel.instructions
        if "sandbox_calls" in m.meta:
            metrics["sandbox_calls"] = m.meta["sandbox_calls"]
        read = [self.store.manifest(r.run, r.step, r.key) for r in (inputs or {}).values()]
        step_run = self.tracker.log_step(self.parent_run_id, m, sample, funnel,
                                         params if isinstance(params, BaseModel) else None, reused=reused, metrics=metrics,
                                         inputs=[x for x in read if x is not None])
        if training_run is not None:
            self.tracker.client.set_tag(step_run, "autoif.training_run_id", training_run)
        artifact_table(
            f"{self.cfg.run_name}-{m.step}",
            [{"step": m.step, "rows_in": funnel.rows_in, "kept": funnel.rows_out, "dropped": funnel.dropped, "reason": r,
              "count": c} for r, c in (funnel.reasons.items() or [("-", 0)])],
            f"{m.step}: {funnel.rows_out} kept of {funnel.rows_in} in; output {m.uri}" + (" (reused)" if reused else ""),
        )
        return m

    # --- training steps (StepSpec.tracked): their own MLflow run, open while the task trains ---------------

    def open_training_run(self, step: str, key: str) -> str:
        from autoif.runtime import lineage

        return lineage.open_training_run(self.tracker, self.parent_run_id, step, key, run_name=f"{self.cfg.run_name}:{step}")

    def training_env(self, training_run: str) -> dict[str, str]:
        from autoif.runtime import lineage

        return lineage.training_env(self.tracker, training_run)

    def record_training(self, ref: StepRef, section: str | None, inputs: dict[str, StepRef],
                        training_run: str | None, cached: bool = False) -> Manifest:
        """A finished training step: its datasets (the inputs that are not the starting model ``init``), the
        logged model (and its registered version when ``train.register_model`` says) on the training run; a
        step answered from the store points at the training run that made it."""
        from autoif.runtime import lineage

        m = self.store.manifest(ref.run, ref.step, ref.key)
        if m is None:
            raise RuntimeError(f"step {ref.step}: task returned {ref.uri} but it has no manifest")
        frame, _ = self.store.read_step(m)
        kept = frame[frame["reason"].isna()]
        if training_run is None:
            training_run = lineage.find_training_run(self.tracker, m.key)
        elif len(kept):
            datasets = []
            for name, r in inputs.items():
                if name == "init":
                    continue
                dm = self.store.manifest(r.run, r.step, r.key)
                datasets.append((dm, next(iter(self.store.iter_step(dm, batch_rows=200)), None)))
            record = lineage.record_training(self.tracker, self.parent_run_id, training_run, kept.iloc[0].to_dict(),
                                             datasets, self.cfg.train.register_model,
                                             params={"step": m.step, "key": m.key, "uri": m.uri})
            self.trained[m.step] = record
        if training_run is not None:
            self.training_runs[m.step] = training_run
        return self.record(ref, section, training_run=training_run, cached=cached, inputs=inputs)

    def log_iteration(self, prefix: str, iteration: int, values: dict[str, float]) -> None:
        """Per-iteration values on the flow's MLflow run as one metric history each (``<prefix>.<name>`` at step
        ``iteration``): the online curve."""
        from mlflow.entities import Metric

        self.tracker.client.log_batch(self.parent_run_id, metrics=[
            Metric(f"{prefix}.{k}", float(v), 0, iteration) for k, v in values.items() if v == v])


@contextlib.contextmanager
def pipeline_run(cfg: RunConfig, flow_name: str, parent_run_id: str | None = None) -> Iterator[PipelineRun]:
    """Open the store and the MLflow parent run (tagged with the Prefect flow run); at the end log the run's
    LLM usage, the funnel (markdown, plot, Prefect artifact) and the run's status."""
    from mlflow.entities import Metric
    from prefect.runtime import flow_run

    tracker = Tracker(cfg.tracking)
    flow_run_id = flow_run.get_id()
    url = flow_run.get_flow_run_ui_url() if flow_run_id else None
    if url is not None and not url.startswith(("http://", "https://")):  # an ephemeral run has no UI: no link
        url = None
    parent = tracker.start_pipeline_run(flow_name, cfg, flow_run_id, url, parent_run_id=parent_run_id)
    run = PipelineRun(cfg=cfg, flow_name=flow_name, store=Store.from_config(cfg.store), tracker=tracker,
                      parent_run_id=parent)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        usage = run.usage or {"llm_requests": 0.0}  # 0 requests when every step came from the cache
        tracker.client.log_batch(parent, metrics=[Metric(k, v, 0, 0) for k, v in usage.items()])
        if run.funnels:
            tracker.client.log_text(parent, funnel_markdown(run.funnels), "funnel.md")
            log_funnel_plot(tracker.client, parent, run.funnels)
            artifact_markdown(f"{cfg.run_name}-{flow_name}-funnel", funnel_markdown(run.funnels),
                              f"AutoIF funnel of run {cfg.run_name}")
        tracker.end_run(parent, status)


def log_survival(run: PipelineRun, first: StepRef, last: StepRef, group: str = "family") -> dict[str, float]:
    """Survival per group (e.g. seed family) from ``first`` to ``last``, on the flow's MLflow run as
    ``survival.<group>.<value>``. Reads the ``<group>.<value>.kept`` counts the two steps logged; no data."""
    from mlflow.entities import Metric

    counts = [(run.store.manifest(r.run, r.step, r.key).meta.get("metrics") or {}) for r in (first, last)]
    head, tail = f"{group}.", ".kept"
    values = {
        f"survival.{k[len(head):-len(tail)]}": counts[1].get(k, 0.0) / v
        for k, v in counts[0].items() if k.startswith(head) and k.endswith(tail) and v > 0
    }
    if values:
        run.tracker.client.log_batch(run.parent_run_id, metrics=[Metric(k, v, 0, 0) for k, v in values.items()])
    return values


def training_data_cost(store: Store, refs: dict[str, StepRef]) -> dict[str, float]:
    """LLM tokens in and out over the run's steps, and per kept SFT row and DPO pair (what a run costs)."""
    tokens_in = tokens_out = 0.0
    for ref in refs.values():
        m = store.manifest(ref.run, ref.step, ref.key)
        usage = (m.meta.get("usage") if m else None) or {}
        tokens_in += float(usage.get("llm_prompt_tokens", 0.0))
        tokens_out += float(usage.get("llm_completion_tokens", 0.0))
    out = {"tokens_in": tokens_in, "tokens_out": tokens_out}
    kept = {name: (store.manifest(r.run, r.step, r.key).meta.get("funnel") or {}).get("rows_out", 0)
            for name, r in refs.items() if name in ("sft", "query_dpo", "instruction_dpo")}
    pairs = kept.get("query_dpo", 0) + kept.get("instruction_dpo", 0)
    if kept.get("sft"):
        out["tokens_per_sft_row"] = (tokens_in + tokens_out) / kept["sft"]
    if pairs:
        out["tokens_per_dpo_pair"] = (tokens_in + tokens_out) / pairs
    return out


def log_training_data_cost(run: PipelineRun, refs: dict[str, StepRef]) -> dict[str, float]:
    """:func:`training_data_cost` on the flow's MLflow run (``cost.*``)."""
    from mlflow.entities import Metric

    values = training_data_cost(run.store, refs)
    run.tracker.client.log_batch(run.parent_run_id, metrics=[Metric(f"cost.{k}", v, 0, 0) for k, v in values.items()])
    return values


# --- evaluation -------------------------------------------------------------------------------------------

EVAL_TAG_BENCHMARK = "autoif.eval.benchmark"
EVAL_TAG_MODEL = "autoif.eval.model"
EVAL_TAG_MODEL_RUN = "autoif.eval.model_run_id"  # the MLflow run of the model being evaluated


class ModelRunNotFound(LookupError):
    pass


def publish_evaluation(run: PipelineRun, benchmark: str, model_label: str, values: dict[str, float],
                       tables: dict[str, Any], responses: Any, model_run_id: str | None) -> None:
    """Metrics, per-type tables and the responses file on the evaluation's MLflow run; tags linking it to
    the evaluated model's run (and back); Prefect artifacts of the tables and the headline metrics."""
    from mlflow.entities import Metric

    client, run_id = run.tracker.client, run.parent_run_id
    if model_run_id is not None:
        try:
            client.get_run(model_run_id)
        except Exception as e:  # noqa: BLE001  MLflow raises its own RestException/MlflowException here
            raise ModelRunNotFound(f"model run {model_run_id!r} not found in {run.tracker.tracking_uri}: {e}") from None
        client.set_tag(run_id, EVAL_TAG_MODEL_RUN, model_run_id)
        client.set_tag(model_run_id, f"autoif.eval.{benchmark}.run_id", run_id)  # the model run points back
    client.set_tag(run_id, EVAL_TAG_BENCHMARK, benchmark)
    client.set_tag(run_id, EVAL_TAG_MODEL, model_label)
    client.log_batch(run_id, metrics=[Metric(f"{benchmark}.{k}", float(v), 0, 0) for k, v in values.items() if v == v])
    client.log_text(run_id, json.dumps(values, indent=2), f"{benchmark}/metrics.json")
    for name, table in tables.items():
        client.log_text(run_id, table.to_csv(index=False), f"{benchmark}/{name}.csv")
        client.log_text(run_id, _markdown_table(table), f"{benchmark}/{name}.md")
        artifact_table(f"{run.cfg.run_name}-{benchmark}-{name}", table.to_dict(orient="records"),
                       f"{benchmark} {name.replace('_', ' ')} ({model_label})")
    lines = "".join(json.dumps({"prompt": p, "response": r}, ensure_ascii=False) + "\n"
                    for p, r in zip(responses["prompt"], responses["response"]))
    client.log_text(run_id, lines, f"{benchmark}/responses.jsonl")
    headline = "\n".join(f"| {k} | {v:.4f} |" for k, v in values.items())
    artifact_markdown(f"{run.cfg.run_name}-{benchmark}-metrics", f"| metric | value |\n|---|---:|\n{headline}",
                      f"{benchmark} metrics of {model_label}")


def _markdown_table(table) -> str:
    try:
        return table.to_markdown(index=False)
    except ImportError:  # pandas needs the optional `tabulate` for markdown
        return table.to_string(index=False)


# --- Prefect artifacts ------------------------------------------------------------------------------------


def _artifact_key(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100] or "autoif"


def artifact_table(key: str, rows: list[dict], description: str) -> None:
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if TaskRunContext.get() or FlowRunContext.get():
        create_table_artifact(table=rows, key=_artifact_key(key), description=description)


def artifact_markdown(key: str, md: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get():
        create_markdown_artifact(markdown=md, key=_artifact_key(key), description=description)


def kept_instructions(store: Store, m: Manifest) -> int | None:
    """Distinct instructions among a step's kept rows (None: its rows carry no ``instruction``)."""
    if "instruction" not in m.columns:
        return None
    cols = ["instruction"] + (["reason"] if "reason" in m.columns else [])
    frame = store.read_columns(m, cols)
    kept = frame[frame["reason"].isna()] if "reason" in frame else frame
    return int(kept["instruction"].nunique())


def funnel_artifact_of(cfg: RunConfig, refs: dict[str, StepRef], flow_name: str) -> None:
    """The whole funnel of ``refs`` (read from their manifests) as a markdown artifact of the current flow run:
    a flow that runs the pipeline as its subflow (a deployment's entry flow) shows it on its own page too."""
    store = Store.from_config(cfg.store)
    funnels = []
    for ref in refs.values():
        m = store.manifest(ref.run, ref.step, ref.key)
        if m is not None and m.meta.get("funnel"):
            funnels.append(Funnel(**{**m.meta["funnel"], "instructions": kept_instructions(store, m)}))
    if funnels:
        artifact_markdown(f"{cfg.run_name}-{flow_name}-funnel", funnel_markdown(funnels), f"AutoIF funnel of run {cfg.run_name}")
