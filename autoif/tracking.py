"""MLflow tracking, in one thin place: a parent run per flow run, a nested run per step.

Uses ``MlflowClient`` with explicit run ids (no fluent active-run state), so Prefect tasks running in
worker threads log to the right run. The step's output dataset is linked with ``mlflow.data`` whose
source is the Parquet URI and whose digest is the manifest's digest.
"""
from __future__ import annotations

import datetime as dt
import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
from pydantic import BaseModel

from autoif.config import RunConfig, TrackingConfig
from autoif.store import Manifest


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            if set(v) == {"op", "value"}:  # a Threshold: one readable param, e.g. ">= 0.8"
                out[key] = f"{v['op']} {v['value']}"
            else:
                out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


class Tracker:
    def __init__(self, cfg: TrackingConfig) -> None:
        import mlflow
        from mlflow import MlflowClient

        uri = cfg.tracking_uri
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(cfg.experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(cfg.experiment)
        self.tracking_uri = uri

    def start_pipeline_run(
        self, flow_name: str, cfg: RunConfig, flow_run_id: str | None, flow_run_url: str | None, parent_run_id: str | None = None
    ) -> str:
        """The MLflow run of one flow run (nested under the calling flow's run for a subflow)."""
        tags = {"autoif.flow": flow_name, "autoif.run_name": cfg.run_name, "autoif.preset": cfg.preset.value}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        if flow_run_id:
            tags["prefect.flow_run_id"] = flow_run_id
        if flow_run_url:
            tags["prefect.flow_run_url"] = flow_run_url
        # told apart in the runs list: the run name, the flow and when it started (UTC)
        when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
        run = self.client.create_run(self.experiment_id, run_name=f"{cfg.run_name}:{flow_name} {when}", tags=tags)
        params = flatten(cfg.model_dump(mode="json"))
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run.info.run_id, params=items[i : i + 100])
        self.client.log_text(run.info.run_id, cfg.model_dump_json(indent=2), "config.json")
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_step(
        self,
        parent_run_id: str,
        manifest: Manifest,
        sample: pd.DataFrame | None,
        funnel: "Funnel",
        params: BaseModel | None,
        reused: bool,
        metrics: Mapping[str, float] | None = None,
        inputs: Sequence[Manifest] = (),
    ) -> str:
        """One nested run per step: params, counts in/out, drop reasons, the output dataset. Its start and end
        are the step's own (when its computation started, when its manifest was written), also when reused."""
        from mlflow.entities import Metric, Param

        started, ended = _millis(manifest.meta.get("started_at") or manifest.created_at), _millis(manifest.created_at)
        run = self.client.create_run(
            self.experiment_id,
            start_time=started,
            run_name=manifest.step,
            tags={"mlflow.parentRunId": parent_run_id, "autoif.step": manifest.step, "autoif.key": manifest.key,
                  "autoif.reused": str(reused).lower(), "autoif.uri": manifest.uri},
        )
        rid = run.info.run_id
        p = flatten(params.model_dump(mode="json")) if params is not None else {}
        bins, scalars = split_histograms(metrics or {})
        values = {"rows_in": funnel.rows_in, "rows_out": funnel.rows_out, "rows_dropped": funnel.dropped,
                  **{f"dropped.{r}": c for r, c in funnel.reasons.items()}, **scalars}
        self.client.log_batch(
            rid,
            params=[Param(k, v) for k, v in p.items()],
            metrics=[Metric(k, float(v), 0, 0) for k, v in values.items()],
        )
        # the parent run gets the funnel too, prefixed by step, so runs compare side by side
        self.client.log_batch(parent_run_id, metrics=[Metric(f"{manifest.step}.{k}", float(v), 0, 0) for k, v in values.items()])
        for target in (rid, parent_run_id):
            self.client.log_inputs(target, [dataset_input(manifest, sample)])
        if inputs:  # lineage: the step's run also names the versions it read
            self.client.log_inputs(rid, [dataset_input(m, None, context=f"input:{m.step}") for m in inputs])
        self.client.log_text(rid, json.dumps(funnel.as_dict(), indent=2), "funnel.json")
        if bins:  # distributions: one table (histogram, bin, count), not a metric per bin
            table = pd.DataFrame(bins, columns=["histogram", "bin", "count"])
            self.client.log_table(rid, data=table, artifact_file="histograms.json")
            self.client.log_table(parent_run_id, data=table.assign(step=manifest.step)[["step", *table.columns]],
                                  artifact_file=f"histograms/{manifest.step}.json")
        self.client.set_terminated(rid, end_time=max(ended, started))
        return rid


def split_histograms(metrics: Mapping[str, float]) -> tuple[list[tuple[str, float, float]], dict[str, float]]:
    """(histogram rows ``(name, bin, count)`` from the ``<name>.bin_<lo>`` metrics, the other metrics)."""
    bins, rest = [], {}
    for k, v in metrics.items():
        name, sep, lo = k.rpartition(".bin_")
        if sep:
            bins.append((name, float(lo), float(v)))  # the bin's lower edge
        else:
            rest[k] = v
    return sorted(bins), rest


def _millis(iso: str) -> int:
    """A UTC ISO timestamp as MLflow's milliseconds since the epoch."""
    return int(dt.datetime.fromisoformat(iso).timestamp() * 1000)


def dataset_input(manifest: Manifest, sample: pd.DataFrame | None, context: str | None = None):
    """The MLflow dataset input of a step's output: source = its Parquet URI, digest = the manifest's digest,
    name = the step; the same entity wherever it is logged (the step's run, the pipeline, a training run)."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    if sample is None:
        sample = pd.DataFrame({c: [] for c in manifest.columns})
    with warnings.catch_warnings():  # MLflow registers two local-artifact source classes and warns it picked one
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")  # a sample, not a model signature
        ds = mlflow.data.from_pandas(sample, source=manifest.uri, name=manifest.step, digest=manifest.digest[:32])
        entity = ds._to_mlflow_entity()  # infers the schema: the warning comes from here
    return DatasetInput(entity, tags=[InputTag("mlflow.data.context", context or manifest.step)])


class Funnel(BaseModel):
    """Counts of one step: rows in, rows kept, and why the others were dropped; ``instructions``: how many
    distinct instructions its kept rows still carry (the unit every step shares: the run's survival line)."""

    step: str
    rows_in: int
    rows_out: int
    reasons: dict[str, int]
    instructions: int | None = None

    @property
    def dropped(self) -> int:
        return sum(self.reasons.values())

    def as_dict(self) -> dict:
        return {**self.model_dump(), "dropped": self.dropped}

    @classmethod
    def of(cls, step: str, rows_in: int, out: pd.DataFrame) -> "Funnel":
        reasons = out["reason"].dropna().value_counts().to_dict() if "reason" in out else {}
        kept = int(out["reason"].isna().sum()) if "reason" in out else len(out)
        return cls(step=step, rows_in=rows_in, rows_out=kept, reasons={str(k): int(v) for k, v in reasons.items()})


def funnel_markdown(funnels: list[Funnel]) -> str:
    """Rows per step (each step in its own unit: the rows it reads and writes) and the instructions its kept
    rows carry, then the run's instruction survival line across the steps that carry instructions."""
    lines = ["| step | rows in | kept | dropped | reasons | instructions kept |", "|---|---:|---:|---:|---|---:|"]
    for f in funnels:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(f.reasons.items(), key=lambda kv: -kv[1])) or "-"
        n = "-" if f.instructions is None else str(f.instructions)
        lines.append(f"| {f.step} | {f.rows_in} | {f.rows_out} | {f.dropped} | {reasons} | {n} |")
    line = survival_line(funnels)
    return "\n".join(lines + ([f"\ninstructions surviving: {line}"] if line else []))


def survival_line(funnels: list[Funnel]) -> str:
    """``seeds 40 -> self_instruct 48 -> ... -> sft 3``: distinct instructions kept after each step."""
    return " -> ".join(f"{f.step} {f.instructions}" for f in funnels if f.instructions is not None)


def funnel_figure(funnels: list[Funnel]):
    """Bars per step: rows in, kept, and dropped stacked by reason (the picture of where data is lost)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = [f.step for f in funnels]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(funnels) + 1.5))
    y = list(range(len(funnels)))[::-1]
    ax.barh([v + 0.2 for v in y], [f.rows_in for f in funnels], height=0.4, color="#bbbbbb", label="rows in")
    ax.barh([v - 0.2 for v in y], [f.rows_out for f in funnels], height=0.4, color="#2a7f62", label="kept")
    left = [f.rows_out for f in funnels]
    reasons = sorted({r for f in funnels for r in f.reasons})
    cmap = plt.get_cmap("tab20")
    for k, reason in enumerate(reasons):
        widths = [f.reasons.get(reason, 0) for f in funnels]
        ax.barh([v - 0.2 for v in y], widths, left=left, height=0.4, color=cmap(k % 20), label=f"dropped: {reason}")
        left = [a + b for a, b in zip(left, widths)]
    for v, f in zip(y, funnels):
        ax.text(f.rows_out, v - 0.2, f" {f.rows_out}", va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.set_xlabel("rows (unit per step: instructions, completions or instructions again)")
    ax.set_title("AutoIF funnel")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def log_funnel_plot(client, run_id: str, funnels: list[Funnel], name: str = "funnel.png") -> None:
    import matplotlib.pyplot as plt

    fig = funnel_figure(funnels)
    try:
        client.log_figure(run_id, fig, name)
    finally:
        plt.close(fig)

