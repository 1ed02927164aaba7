"""The `autoif` command as a user runs it: a real subprocess, a real (ephemeral) Prefect run."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_script

AUTOIF = str(Path(sys.executable).parent / "autoif")

CANNED = [
    "Sure! Here are some:\n- Answer with exactly 7 words.\n- answer in all lowercase letters,  with no capital letters at all.\n- x",
    "- Use exactly two hashtags in your response.\n- Écrivez en français uniquement s'il vous plaît, é è ê à ù ç ô",
    "I cannot think of any.",
]


def self_instruct_script(cfg, outputs=CANNED) -> list[dict]:
    """Canned self-instruct completions for the config's seed file (every later prompt has none)."""
    from autoif.tasks.seeds import read_seeds, seeds_path
    from autoif.tasks.self_instruct import SELF_INSTRUCT_PROMPT

    seeds = read_seeds(seeds_path(cfg.self_instruct))
    return [{"prompt": SELF_INSTRUCT_PROMPT.format(seeds="\n".join(f"- {s}" for s in seeds["instruction"])), "outputs": outputs}]


def cli(*args, cwd, env=None, timeout=300):
    return subprocess.run([AUTOIF, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_help_is_fast(tmp_path):
    t = time.perf_counter()
    r = cli("--help", cwd=tmp_path)
    assert r.returncode == 0
    assert all(c in r.stdout for c in ("run", "runs", "show", "eval", "compare", "--debug"))
    assert time.perf_counter() - t < 1.0
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import autoif.cli"], capture_output=True, text=True).stderr
    for heavy in ("prefect", "mlflow", "torch", "pandas"):
        assert f" {heavy}\n" not in out, f"{heavy} imported by `autoif --help`"


@pytest.mark.slow  # starts its own ephemeral Prefect server, as a user's first run does (~30 s here)
def test_run_runs_show(tmp_path, make_cfg):
    cfg = make_cfg({"self_instruct.n_calls": 3})
    write_script(tmp_path / "script.jsonl", self_instruct_script(cfg))
    conf = tmp_path / "run.yaml"
    conf.write_text(yaml.safe_dump({
        "run_name": "cli", "engine": {"kind": "scripted", "scripted_path": str(tmp_path / "script.jsonl")},
        "store": {"root": str(tmp_path / "store")}, "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    }))
    env = {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results")}
    env_no_api = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # its own ephemeral server
    r = subprocess.run([AUTOIF, "run", "--config", str(conf), "--preset", "paper", "--set", "self_instruct.n_calls=3",
                        "--until", "self_instruct"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**env_no_api, "COLUMNS": "200", **env})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr == "", r.stderr[-3000:]  # Prefect's and MLflow's console logging went to the log file
    assert "self_instruct done: 40 in, 42 kept" in r.stdout, r.stdout
    funnel = next(l for l in r.stdout.splitlines() if "self_instruct" in l and "│" in l)  # the funnel table's row
    assert "40" in funnel and "42" in funnel and "too_short 1" in funnel, r.stdout
    # one unit shared by every step: the distinct instructions still kept, across the run
    assert "instructions surviving: seeds 40 -> self_instruct 42" in r.stdout, r.stdout
    logs = list((tmp_path / ".autoif" / "logs").glob("cli-*.log"))
    assert len(logs) == 1 and "Starting temporary server" in logs[0].read_text()
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
