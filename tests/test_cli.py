"""The `autoif` command as a user runs it: a real subprocess, a real (ephemeral) Prefect run."""
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import write_script
from tests.test_flow_foundation import script_for

AUTOIF = str(Path(sys.executable).parent / "autoif")


def cli(*args, cwd, env=None, timeout=300):
    return subprocess.run([AUTOIF, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_help_is_fast(tmp_path):
    t = time.perf_counter()
    r = cli("--help", cwd=tmp_path)
    assert r.returncode == 0 and "run" in r.stdout and "runs" in r.stdout and "show" in r.stdout
    assert time.perf_counter() - t < 1.0
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import autoif.cli"], capture_output=True, text=True).stderr
    for heavy in ("prefect", "mlflow", "torch", "pandas"):
        assert f" {heavy}\n" not in out, f"{heavy} imported by `autoif --help`"


def test_run_runs_show(tmp_path, make_cfg):
    cfg = make_cfg({"self_instruct.n_calls": 3})
    write_script(tmp_path / "script.jsonl", script_for(cfg))
    conf = tmp_path / "run.yaml"
    conf.write_text(yaml.safe_dump({
        "run_name": "cli", "engine": {"kind": "scripted", "scripted_path": str(tmp_path / "script.jsonl")},
        "store": {"root": str(tmp_path / "store")}, "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    }))
    env = {"PREFECT_HOME": str(tmp_path / "prefect")}
    r = cli("run", "--config", str(conf), "--preset", "paper", "--set", "self_instruct.n_calls=3", "--until", "self_instruct", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "self_instruct" in r.stdout and "Traceback" not in r.stderr
    r = cli("runs", "--config", str(conf), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if "cli" in l]
    assert any("self_instruct" in l and "46" in l and "42" in l for l in lines), r.stdout  # rows, kept
    r = cli("show", "cli", "self_instruct", "--dropped", "--config", str(conf), cwd=tmp_path)
    assert r.returncode == 0 and "too_short" in r.stdout and "rows=4" in r.stdout, r.stdout
    r = cli("show", "cli", "nosuchstep", "--config", str(conf), cwd=tmp_path)
    assert r.returncode == 1 and "no completed step 'nosuchstep'" in r.stderr


def test_bad_override_is_a_clear_error(tmp_path):
    r = cli("run", "--set", "cross_validation.nope=1", cwd=tmp_path)
    assert r.returncode == 2 and "unknown config key 'cross_validation.nope'" in r.stderr


def test_unknown_until_step(tmp_path):
    r = cli("run", "--until", "nope", cwd=tmp_path)
    assert r.returncode == 2 and "unknown step 'nope'" in r.stderr
