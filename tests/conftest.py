"""Shared fixtures: one Prefect harness per session, a per-test config with its own store and MLflow."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parent / "data" / "autoif-sample"  # AutoIF's published sample, with its licence


def pytest_configure(config):
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One ephemeral Prefect server for the whole session (startup costs ~10-25 s here)."""
    home = tmp_path_factory.mktemp("prefect_home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(home / "results")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def make_cfg(tmp_path):
    """A RunConfig isolated in tmp_path (store + SQLite MLflow), scripted engine, overrides on top."""
    from autoif.config import load_config

    def make(overrides: dict | None = None, preset: str | None = None, script: list[dict] | None = None):
        base = {
            "store.root": str(tmp_path / "store"),
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "engine.kind": "scripted",
            "engine.scripted_path": str(tmp_path / "script.jsonl"),
        }
        if script is not None:
            write_script(tmp_path / "script.jsonl", script)
        return load_config(preset=preset, overrides={**base, **(overrides or {})})

    return make


def write_script(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP API (moto) on loopback, with a bucket; yields the endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="autoif-test")
    yield url
    server.stop()


def start_service(cmd: list[str], health_url: str, log_path: Path, env: dict | None = None, timeout: float = 180):
    """Start a real server process on loopback and wait until health_url answers 200; returns the Popen."""
    import subprocess
    import time
    import urllib.request

    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(health_url, timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_service(proc)
    raise TimeoutError(f"{cmd[0]} not healthy at {health_url} after {timeout}s: {log_path.read_text()[-2000:]}")


def stop_service(proc) -> None:
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def descendants(pid: int) -> set[int]:
    """Live descendants of pid (not uid-wide: other sessions may run sandboxes concurrently)."""
    out: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:  # pid exited while we looked: it has no descendants left
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as fh:
                children = [int(c) for c in fh.read().split()]
        except FileNotFoundError:  # that thread exited meanwhile
            continue
        for c in children:
            out.add(c)
            out |= descendants(c)
    return out
