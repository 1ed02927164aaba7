"""MLflow lineage of training runs, in the flow's process: pipeline run -> training run (nested) -> the dataset
versions it read (the store manifests' names and digests) -> an MLflow 3 logged model (the adapter and its base
model reference) -> a registered model version. From a registered version a user walks back: version ->
logged model -> training run -> its datasets and its parent pipeline run.

The training run is opened before the task trains, so TRL's own MLflow callback (``report_to="mlflow"``)
logs its metrics and TrainingArguments into it; :func:`training_env` is what the task process needs for that.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pandas as pd

from autoif.store import Manifest
from autoif.tracking import Tracker, dataset_input


@dataclass
class TrainingRecord:
    run_id: str
    model_id: str  # the MLflow LoggedModel id
    model_uri: str  # models:/<model_id>
    registered_name: str | None = None
    version: str | None = None


def open_training_run(tracker: Tracker, parent_run_id: str, step: str, key: str, run_name: str) -> str:
    run = tracker.client.create_run(tracker.experiment_id, run_name=run_name, tags={
        "mlflow.parentRunId": parent_run_id, "autoif.step": step, "autoif.key": key, "autoif.training": "true"})
    return run.info.run_id


def training_env(tracker: Tracker, run_id: str) -> dict[str, str]:
    """transformers' MLflowCallback resumes the run ``MLFLOW_RUN_ID`` names (``mlflow.start_run()`` reads it) and
    ends it when training ends; :func:`record_training` then adds the model and finishes it."""
    return {"MLFLOW_TRACKING_URI": tracker.tracking_uri, "MLFLOW_RUN_ID": run_id,
            "MLFLOW_EXPERIMENT_ID": tracker.experiment_id}


def record_training(tracker: Tracker, parent_run_id: str, training_run_id: str, model: Mapping[str, Any],
                    datasets: Sequence[tuple[Manifest, pd.DataFrame | None]], register_name: str | None,
                    params: Mapping[str, Any] | None = None) -> TrainingRecord:
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Param

    from autoif.policy import unpack_weights

    client = tracker.client
    client.log_inputs(training_run_id, [dataset_input(m, sample, context="training") for m, sample in datasets])
    ours = {f"autoif.{k}": str(v)[:500] for k, v in {**(params or {}), "model_id": model["model_id"],
            "method": model["method"], "parent": model["parent"], "base_model": model["base_model"],
            "base_identity": model["base_identity"], "weights_digest": model["weights_digest"]}.items()}
    client.log_batch(training_run_id, params=[Param(k, v) for k, v in ours.items()])
    logged = client.create_logged_model(
        tracker.experiment_id, name=f"{model['model_id']}", source_run_id=training_run_id,
        params={"base_model": str(model["base_model"]), "base_identity": str(model["base_identity"]),
                "method": str(model["method"]), "parent": str(model["parent"]), "is_adapter": str(model["is_adapter"])},
        tags={"autoif.weights_digest": str(model["weights_digest"]), "autoif.model_id": str(model["model_id"])})
    with tempfile.TemporaryDirectory() as tmp:
        d = unpack_weights(bytes(model["weights"]), root=tmp)
        client.log_model_artifacts(logged.model_id, str(d))
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(training_run_id, [LoggedModelOutput(logged.model_id, 0)])
    record = TrainingRecord(run_id=training_run_id, model_id=logged.model_id, model_uri=f"models:/{logged.model_id}")
    if register_name:
        record.registered_name, record.version = register_name, _register(tracker, register_name, record, model)
    client.set_terminated(training_run_id, "FINISHED")
    return record


def _register(tracker: Tracker, name: str, record: TrainingRecord, model: Mapping[str, Any]) -> str:
    """A version of ``name`` for the logged model; the same weights registered before are that version."""
    client = tracker.client
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    for v in client.search_model_versions(f"name = '{name}'"):
        if (v.tags or {}).get("autoif.weights_digest") == model["weights_digest"]:
            return str(v.version)
    v = client.create_model_version(name, source=record.model_uri, run_id=record.run_id, model_id=record.model_id,
                                    tags={"autoif.weights_digest": str(model["weights_digest"]),
                                          "autoif.model_id": str(model["model_id"]), "autoif.method": str(model["method"])})
    return str(v.version)


def find_training_run(tracker: Tracker, key: str) -> str | None:
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`autoif.key` = '{key}' and tags.`autoif.training` = 'true'",
                                      order_by=["start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def walk_back(tracker: Tracker, name: str, version: str) -> dict[str, Any]:
    """A registered version -> its logged model -> training run -> the run's datasets and parent pipeline run."""
    client = tracker.client
    v = client.get_model_version(name, version)
    run = client.get_run(v.run_id)
    model_id = v.model_id or v.source.removeprefix("models:/")  # a file store keeps it only in the source URI
    return {"model_id": model_id, "source": v.source, "training_run": v.run_id,
            "logged_model_source_run": client.get_logged_model(model_id).source_run_id,
            "datasets": [{"name": d.dataset.name, "digest": d.dataset.digest, "source": _uri(d.dataset.source)}
                         for d in run.inputs.dataset_inputs],
            "pipeline_run": run.data.tags.get("mlflow.parentRunId")}


def _uri(source: str) -> str:
    """MLflow keeps a dataset's source as JSON (``{"uri": ...}``): the URI in it."""
    try:
        return json.loads(source).get("uri", source)
    except (ValueError, AttributeError):
        return source
