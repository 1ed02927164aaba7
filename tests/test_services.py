"""The pipeline against real services on loopback: a Prefect server, an MLflow server, an S3 API (moto).

A user's story end to end: a scheduled run fails in one task; the user fixes the cause and runs
`prefect flow-run retry`; only the failed task recomputes; MLflow (a real server) holds the runs with
their datasets on S3.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, start_service, stop_service, write_script
from tests.test_flow_foundation import script_for

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect_server")
    port = free_port()
    env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": ""}
    proc = start_service([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                         f"http://127.0.0.1:{port}/api/health", home / "server.log", env=env)
    yield f"http://127.0.0.1:{port}/api"
    stop_service(proc)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    proc = start_service([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
                          "--default-artifact-root", str(home / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                         f"http://127.0.0.1:{port}/health", home / "server.log", env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    yield f"http://127.0.0.1:{port}"
    stop_service(proc)


def test_failed_task_retry_on_prefect_server_with_s3_and_mlflow_server(tmp_path, make_cfg, prefect_server, mlflow_server, s3_server):
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "client"),
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "COLUMNS": "200",
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results")}
    script = tmp_path / "script.jsonl"
    write_script(script, [])  # nothing canned yet: self_instruct will fail
    conf = tmp_path / "run.yaml"
    conf.write_text(yaml.safe_dump({
        "run_name": "svc", "engine": {"kind": "scripted", "scripted_path": str(script)},
        "store": {"root": "s3://autoif-test/svc", "s3_endpoint_url": s3_server},
        "tracking": {"tracking_uri": mlflow_server, "experiment": "svc"}, "self_instruct": {"n_calls": 3},
    }))
    r = subprocess.run([str(BIN / "autoif"), "run", "--config", str(conf), "--until", "self_instruct"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "no canned output" in r.stderr + r.stdout

    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        async def flow_run_and_tasks():
            async with get_client() as c:
                runs = await c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["svc"])))
                tasks = await c.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [r.id for r in runs]}))
                subruns = await c.read_flow_runs()
                return runs, tasks, subruns

        runs, _, all_runs = asyncio.run(flow_run_and_tasks())
        assert len(runs) == 1 and runs[0].state.is_failed(), [(r.name, r.state.name) for r in all_runs]
        failed_id = str(runs[0].id)

        # the user fixes the cause and retries only what failed
        cfg = make_cfg({"self_instruct.n_calls": 3})
        write_script(script, script_for(cfg))
        r = subprocess.run([str(BIN / "prefect"), "flow-run", "retry", failed_id, "--entrypoint", str(REPO / "flows/pipeline.py") + ":autoif_pipeline"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

        async def task_states():
            async with get_client() as c:
                fr = await c.read_flow_run(runs[0].id)
                trs = await c.read_task_runs()
                return fr, trs

        fr, trs = asyncio.run(task_states())
        assert fr.state.is_completed()
        by_name: dict[str, list[str]] = {}
        for t in sorted(trs, key=lambda t: t.expected_start_time or t.created):
            by_name.setdefault(t.name, []).append(t.state.name)
        # seeds completed in the failed attempt and was answered from the cache on retry; self_instruct failed, then ran
        assert by_name["seeds"][0] == "Completed" and all(s == "Cached" for s in by_name["seeds"][1:]), by_name
        assert by_name["self_instruct"][0] == "Failed" and by_name["self_instruct"][-1] == "Completed", by_name

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("svc")
    step_runs = client.search_runs([exp.experiment_id], "tags.`autoif.step` = 'self_instruct'")
    ok = [r for r in step_runs if r.info.status == "FINISHED"]
    assert ok and json.loads(ok[0].inputs.dataset_inputs[0].dataset.source)["uri"].startswith("s3://autoif-test/svc/svc/self_instruct/")
    parents = client.search_runs([exp.experiment_id], "tags.`autoif.flow` = 'pipeline'")
    assert {p.data.tags["prefect.flow_run_id"] for p in parents}  # linked to Prefect flow runs ...
    ui = prefect_server.removesuffix("/api")
    assert all(p.data.tags["prefect.flow_run_url"] == f"{ui}/flow-runs/flow-run/{p.data.tags['prefect.flow_run_id']}" for p in parents), [(p.data.tags.get("prefect.flow_run_url"), p.data.tags["prefect.flow_run_id"]) for p in parents]  # ... and the UI
