"""Deployments as users run them: `autoif deploy` registers deployments/prefect.yaml on a real Prefect server
(loopback), a real `prefect worker` for the `autoif` process pool picks up a run of the pipeline deployment
(scripted engine, stages A and B until the exports), and the Prefect API shows the flow run completed with
one named task run per step (and batch) and every step's funnel artifact.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, start_service, stop_service
from tests.test_services import prefect_server  # noqa: F401  (the real `prefect server` fixture)
from tests.test_stage_b_flow import stage_b_cfg  # noqa: F401  (stages A and B with canned outputs)

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
DEPLOYMENTS = {  # flow name/deployment name -> entry point, as deployments/prefect.yaml declares them
    "autoif-scheduled/weekly": "flows/pipeline.py:scheduled_pipeline",
    "autoif-deploy-pipeline/on-demand": "autoif.deploy.pipeline",
    "autoif-deploy-instructions/stage-a": "autoif.deploy.instructions",
    "autoif-deploy-data/stage-b": "autoif.deploy.data",
    "autoif-deploy-train/training": "autoif.deploy.train",
    "autoif-deploy-evaluate/evaluation": "autoif.deploy.evaluation",
}
STEPS = ["seeds", "self_instruct", "verifier_synthesis", "cross_validation", "reference_agreement", "back_translation",
         "consistency_filter", "stage_b_instructions", "queries", "query_augmentation", "response_generation",
         "verification", "contamination", "quality_filter", "sft", "query_dpo", "instruction_dpo", "export_trl_sft",
         "export_trl_dpo", "export_llamafactory", "export_hf"]
BATCHED = {"verifier_synthesis", "cross_validation", "back_translation", "consistency_filter", "response_generation",
           "verification", "quality_filter"}


def test_deploy_worker_runs_the_pipeline_deployment(tmp_path, prefect_server, stage_b_cfg):  # noqa: F811
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from autoif.runtime.recording import _artifact_key
    from autoif.store import Store

    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "client"),
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results"), "AUTOIF_HOME": str(REPO), "COLUMNS": "200"}
    r = subprocess.run([str(BIN / "autoif"), "deploy"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "work pools created: autoif" in r.stdout

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        async def deployments():
            async with get_client() as c:
                found = await c.read_deployments()
                flows = {f.id: f.name for f in await c.read_flows()}
                return {f"{flows[d.flow_id]}/{d.name}": d for d in found}

        registered = asyncio.run(deployments())
        assert {k: d.entrypoint for k, d in registered.items()} == DEPLOYMENTS
        for d in registered.values():  # each: the process pool, the pull step, its parameters
            assert d.work_pool_name == "autoif" and d.parameters["config_path"] == "deployments/configs/weekly.yaml"
            assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $AUTOIF_HOME }}"}}]
        assert [s.schedule.cron for s in registered["autoif-scheduled/weekly"].schedules] == ["0 3 * * 1"]
        assert registered["autoif-deploy-pipeline/on-demand"].parameters["until"] == "exports"

        # a worker for the pool; the run's config is a file, as users give it
        port = free_port()
        worker = start_service([str(BIN / "prefect"), "worker", "start", "--pool", "autoif", "--with-healthcheck"],
                               f"http://127.0.0.1:{port}/health", tmp_path / "worker.log",
                               env={**env, "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1", "PREFECT_WORKER_WEBSERVER_PORT": str(port),
                                    "PREFECT_WORKER_QUERY_SECONDS": "1"})
        try:
            cfg = stage_b_cfg
            conf = tmp_path / "run.yaml"
            conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
            fr = run_deployment("autoif-deploy-pipeline/on-demand", timeout=600, poll_interval=2, parameters={
                "config_path": str(conf), "preset": None, "run_name_template": "{run_name}", "until": "exports"})
        finally:
            stop_service(worker)
        log = (tmp_path / "worker.log").read_text()
        assert fr.state.is_completed(), f"{fr.state}\n{log[-4000:]}"

        async def runs_tasks_artifacts():
            async with get_client() as c:
                subflows = await c.read_flow_runs(flow_run_filter=FlowRunFilter(name={"any_": [cfg.run_name]}))
                ids = [s.id for s in subflows]
                tasks = await c.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": ids}))
                arts = await c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
                parent_task = await c.read_task_run(subflows[0].parent_task_run_id) if subflows else None
                top = await c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id])))
                return subflows, tasks, arts, parent_task, top

        subflows, tasks, arts, parent_task, top = asyncio.run(runs_tasks_artifacts())
    # the deployment's flow run ran the pipeline flow as its subflow, named after the run
    assert len(subflows) == 1 and subflows[0].state.is_completed() and parent_task.flow_run_id == fr.id
    states = {t.name: t.state.name for t in tasks}
    assert all(states.get(s) == "Completed" for s in STEPS), states  # one task run per step, named after it
    for s in BATCHED:  # and one per batch: step[0], step[1], ...
        assert states.get(f"{s}[0]") == "Completed", (s, states)
    assert not [n for n, st in states.items() if st != "Completed"], states
    # every step the store holds has its funnel table; the run's funnel is one markdown artifact
    done = {m.step for m in Store(cfg.store.root).manifests(cfg.run_name)}
    assert done == set(STEPS)
    by_key = {a.key: a for a in arts}
    assert all(_artifact_key(f"{cfg.run_name}-{s}") in by_key for s in STEPS), sorted(by_key)
    assert json.loads(by_key[_artifact_key(f"{cfg.run_name}-sft")].data)[0]["kept"] == 5  # the run's funnel numbers
    funnel = by_key[_artifact_key(f"{cfg.run_name}-pipeline-funnel")].data
    assert all(f"| {s} |" in funnel for s in STEPS), funnel
    # the deployment's own (top-level) flow run carries the whole funnel too, with the same numbers
    top_funnel = next(a for a in top if a.key == _artifact_key(f"{cfg.run_name}-deployment-funnel")).data
    assert all(f"| {s} |" in top_funnel for s in STEPS) and "| sft | " in top_funnel, top_funnel
    sft_row = next(line for line in funnel.splitlines() if line.startswith("| sft |"))
    assert sft_row in top_funnel
