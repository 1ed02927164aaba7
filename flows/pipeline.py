"""The whole AutoIF pipeline: the main job ``autoif run`` starts, and the entry point of deployments."""
from __future__ import annotations

import datetime as dt

from autoif.flows.data import stage_b
from autoif.flows.instructions import stage_a
from autoif.flows.training import stage_c
from prefect import flow

from autoif.config import PipelineStep, RunConfig, load_config
from autoif.runtime import task_runner
from autoif.runtime.recording import funnel_artifact_of, log_training_data_cost, pipeline_run
from autoif.store import StepRef


@flow(name="autoif-pipeline", flow_run_name="{cfg.run_name}", log_prints=True)
def autoif_pipeline(cfg: RunConfig, until: PipelineStep = PipelineStep.evaluation) -> dict[str, StepRef]:
    """Stage A (instructions, verifiers), stage B (queries, responses, verification, training data), stage C
    (SFT, offline DPO, online iterations) and the evaluation of the base and each trained policy. ``until``
    stops after a step (``exports``: the data only, no training)."""
    with pipeline_run(cfg, "pipeline") as run:
        refs = stage_a(run, until)
        if PipelineStep(until).position > PipelineStep.consistency_filter.position:
            refs.update(stage_b(run, refs, until))
            log_training_data_cost(run, refs)  # tokens in/out, per kept SFT row and DPO pair
        if PipelineStep(until).position > PipelineStep.exports.position:
            refs.update(stage_c(run, refs, until))
        return refs


def run_pipeline(cfg: RunConfig, until: PipelineStep = PipelineStep.evaluation) -> dict[str, StepRef]:
    """The pipeline flow on the task runner ``cfg.runtime`` names (threads, a Dask or a Ray cluster)."""
    return autoif_pipeline.with_options(task_runner=task_runner(cfg.runtime))(cfg, until=until)


@flow(name="autoif-scheduled", log_prints=True)
def scheduled_pipeline(
    config_path: str | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    run_name_template: str = "{run_name}-{date}",
    until: PipelineStep = PipelineStep.evaluation,
) -> dict[str, StepRef]:
    """Deployment entry point: load the config file, name the run by date so each schedule makes fresh data."""
    cfg = load_config(config_path, preset, overrides or [])
    name = run_name_template.format(run_name=cfg.run_name, date=dt.date.today().isoformat())
    cfg = cfg.model_copy(update={"run_name": name})
    refs = run_pipeline(cfg, until=until)
    funnel_artifact_of(cfg, refs, "scheduled")  # the whole funnel on the top-level flow run's page too
    return refs
