"""Fail fast and speak plainly: what a run needs is checked before any flow starts (no Prefect imported), and a
failure is one short message naming the step and the file, line or field, with the traceback in a log file."""
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from autoif.config import load_config
from autoif.preflight import PreflightError, check, check_eval
from tests.conftest import write_script
from tests.test_cli import AUTOIF

SEEDS = ['{"instruction": "Answer in all lowercase letters.", "family": "case"}',
         '{"instruction": "Include the word banana twice.", "family": "keywords"}',
         '{"instruction": "End your response with a question mark.", "family": "punctuation"}']


def seeds_file(tmp_path: Path, lines=SEEDS, name="seeds.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def cfg_with(tmp_path):
    """A config on a good seed file and an existing scripted engine file, with overrides on top."""
    script = write_script(tmp_path / "script.jsonl", [{"prompt": "p", "outputs": ["o"]}])

    def make(overrides: dict | None = None):
        base = {"self_instruct.seeds_path": str(seeds_file(tmp_path)), "engine.kind": "scripted",
                "engine.scripted_path": str(script)}
        return load_config(overrides={**base, **(overrides or {})})

    return make


def preflight_error(cfg, until=None) -> str:
    with pytest.raises(PreflightError) as e:
        check(cfg, until)
    assert "\n" not in str(e.value)
    return str(e.value)


# --- preflight ------------------------------------------------------------------------------------------


def test_good_inputs_pass(cfg_with):
    check(cfg_with())


def test_seed_file_errors_name_file_line_and_field(cfg_with, tmp_path):
    bad = seeds_file(tmp_path, [SEEDS[0], SEEDS[1], '{"instruction": "", "family": "case"}'], "bad.jsonl")
    assert preflight_error(cfg_with({"self_instruct.seeds_path": str(bad)})) == \
        f"self_instruct.seeds_path: {bad}:3: field 'instruction' must be a non-empty string"
    typo = seeds_file(tmp_path, [SEEDS[0], SEEDS[1][:-1]], "typo.jsonl")  # a one-character typo: the closing brace
    assert f"{typo}:2: not valid JSON" in preflight_error(cfg_with({"self_instruct.seeds_path": str(typo)}))
    assert "cannot read" in preflight_error(cfg_with({"self_instruct.seeds_path": str(tmp_path / "none.jsonl")}))


def test_probe_file_is_checked_when_the_run_reaches_cross_validation(cfg_with, tmp_path):
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"response": "fine"}\n{"response": 3}\n')
    cfg = cfg_with({"cross_validation.probes_path": str(probes)})
    check(cfg, until="verifier_synthesis")
    assert preflight_error(cfg, until="cross_validation") == \
        f"cross_validation.probes_path: {probes}:2: field 'response' must be a string"


def test_engine_files(cfg_with, tmp_path):
    msg = preflight_error(cfg_with({"engine.scripted_path": str(tmp_path / "none.jsonl")}))
    assert msg.startswith("engine.scripted_path:") and "none.jsonl" in msg
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "p", "outputs": ["o"]}\n{"prompt": \n')
    assert "not valid JSON" in preflight_error(cfg_with({"engine.scripted_path": str(broken)}))
    assert preflight_error(cfg_with({"engine.kind": "llamacpp", "engine.model_path": str(tmp_path / "m.gguf")})) == \
        f"engine.model_path: GGUF model file not found: {tmp_path / 'm.gguf'}"
    assert "engine.model_path" in preflight_error(cfg_with({"engine.kind": "vllm"}))


def test_nli_model_is_checked_when_the_run_reaches_the_consistency_filter(cfg_with, tmp_path):
    cfg = cfg_with({"consistency_filter.mode": "nli"})
    check(cfg, until="back_translation")
    assert "consistency_filter.nli_model" in preflight_error(cfg)
    missing = cfg_with({"consistency_filter.mode": "nli", "consistency_filter.nli_model": str(tmp_path / "nli")})
    assert preflight_error(missing) == f"consistency_filter.nli_model: not found: {tmp_path / 'nli'}"


class _Models(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802  (http.server's name)
        body = json.dumps({"data": [{"id": "m"}]}).encode()
        self.send_response(self.status if self.path == "/v1/models" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def models_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    _Models.status = 200


def test_openai_base_url_must_answer(cfg_with, models_server):
    openai = {"engine.kind": "openai"}
    assert "engine.base_url is required" in preflight_error(cfg_with(openai))
    check(cfg_with({**openai, "engine.base_url": f"{models_server}/v1"}))
    assert "HTTP 404" in preflight_error(cfg_with({**openai, "engine.base_url": models_server}))  # no /v1
    _Models.status = 401
    assert "API key in $OPENAI_API_KEY" in preflight_error(cfg_with({**openai, "engine.base_url": f"{models_server}/v1"}))

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert preflight_error(cfg_with({**openai, "engine.base_url": f"http://127.0.0.1:{port}/v1"})) == \
        f"engine.base_url: cannot reach http://127.0.0.1:{port}/v1/models: ConnectError: [Errno 111] Connection refused"
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        t = time.perf_counter()
        assert preflight_error(cfg_with({**openai, "engine.base_url": url})) == \
            f"engine.base_url: no answer from GET {url}/models within 1s"
        assert time.perf_counter() - t < 3


def test_eval_checks_the_engine_only_when_it_answers(cfg_with, tmp_path):
    responses = tmp_path / "responses.jsonl"
    responses.write_text('{"prompt": "p", "response": "r"}\n')
    no_model = cfg_with({"engine.kind": "llamacpp", "engine.model_path": str(tmp_path / "m.gguf")})
    check_eval(no_model, "ifbench", responses)  # scoring a file needs no engine
    with pytest.raises(PreflightError, match="engine.model_path"):
        check_eval(no_model, "ifeval")
    with pytest.raises(PreflightError, match="engine.model_path"):
        check_eval(no_model, "followbench", responses)  # FollowBench's judge is the engine
    with pytest.raises(PreflightError, match="--responses: file not found"):
        check_eval(no_model, "ifbench", tmp_path / "none.jsonl")


def test_exit_codes_and_messages():
    from autoif.tasks.seeds import SeedFileError

    from autoif.cli import error_message, exit_code
    from autoif.llm.errors import LLMSetupError, MissingScriptError
    from autoif.runtime.orchestration import StepFailed

    missing = StepFailed("self_instruct", MissingScriptError("s.jsonl: no canned output"))
    assert exit_code(missing) == 1
    assert error_message(missing) == "step self_instruct: MissingScriptError: s.jsonl: no canned output"
    assert exit_code(StepFailed("seeds", SeedFileError("s.jsonl:3: field 'instruction' ..."))) == 2
    assert exit_code(StepFailed("verifier_synthesis", LLMSetupError("HTTP 401"), batch=2)) == 2
    assert exit_code(PreflightError("x")) == 2 and exit_code(RuntimeError("x")) == 1
    assert error_message(RuntimeError("boom")) == "RuntimeError: boom"


# --- the CLI --------------------------------------------------------------------------------------------

IN_PROCESS = """
import sys, time
from autoif.cli import app
t = time.perf_counter()
try:
    app(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(code, time.perf_counter() - t, [m for m in ("prefect", "mlflow") if m in sys.modules])
"""


def test_bad_seed_line_fails_before_any_flow(tmp_path):
    bad = seeds_file(tmp_path, [SEEDS[0], SEEDS[1], '{"instruction": "", "family": "case"}'], "bad.jsonl")
    write_script(tmp_path / "script.jsonl", [{"prompt": "p", "outputs": ["o"]}])
    args = ["run", "--set", f"self_instruct.seeds_path={bad}", "--set", "engine.kind=scripted",
            "--set", f"engine.scripted_path={tmp_path / 'script.jsonl'}"]
    t = time.perf_counter()
    r = subprocess.run([AUTOIF, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - t
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) <= 3, r.stderr
    assert f"{bad}:3: field 'instruction' must be a non-empty string" in lines[0]
    log = re.search(r"log: (\S+)", r.stderr).group(1)
    assert "SeedFileError" in (tmp_path / log).read_text()
    assert wall < 10, wall  # python, typer, pandas; no Prefect server (one takes ~15 s to start here)

    # the same command in a Python process that reports what it imported and how long it took
    r = subprocess.run([sys.executable, "-c", IN_PROCESS, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    code, seconds, heavy = r.stdout.strip().split(" ", 2)
    assert code == "2" and heavy == "[]", r.stdout + r.stderr  # neither Prefect nor MLflow imported
    assert float(seconds) < 2.0  # config + preflight


@pytest.fixture
def harness_env(prefect_harness, tmp_path):
    """Environment of a CLI subprocess that runs its flow on the session's Prefect server (no ~15 s start)."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "COLUMNS": "200", "PREFECT_API_URL": PREFECT_API_URL.value(),
            "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results")}


def failing_run_args(tmp_path: Path, run_name: str) -> list[str]:
    """A run whose self-instruct prompt has no canned output (the scripted engine raises MissingScriptError)."""
    write_script(tmp_path / "script.jsonl", [{"prompt": "some other prompt", "outputs": ["o"]}])
    return ["run", "--until", "self_instruct", "--set", f"run_name={run_name}",
            "--set", f"self_instruct.seeds_path={seeds_file(tmp_path)}", "--set", "engine.kind=scripted",
            "--set", f"engine.scripted_path={tmp_path / 'script.jsonl'}", "--set", f"store.root={tmp_path / 'store'}",
            "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]


def test_failure_inside_a_step_is_one_message_and_a_log_file(harness_env, tmp_path):
    r = subprocess.run([AUTOIF, *failing_run_args(tmp_path, "cli-fail")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=harness_env)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) <= 3, r.stderr
    assert lines[0].startswith("error: step self_instruct: MissingScriptError: ")
    assert f"{tmp_path / 'script.jsonl'}: no canned output" in lines[0]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    log = tmp_path / re.search(r"log: (\S+)", r.stderr).group(1)
    assert log.parent == tmp_path / ".autoif" / "logs" and log.name.startswith("cli-fail-")
    text = log.read_text()
    assert "Traceback" in text and "MissingScriptError" in text and "Task run encountered an exception" in text


def test_debug_shows_the_traceback(prefect_harness, tmp_path, monkeypatch):
    """In-process (CliRunner), as the evaluation tests call the CLI: --debug prints the traceback, and the
    logging handlers the command swapped are back afterwards."""
    import logging

    from typer.testing import CliRunner

    from autoif.cli import app

    monkeypatch.chdir(tmp_path)
    before = {n: list(logging.getLogger(n).handlers) for n in ("", "prefect", "mlflow")}
    res = CliRunner().invoke(app, ["--debug", *failing_run_args(tmp_path, "cli-debug")])
    assert res.exit_code == 1, res.output
    assert "Traceback" in res.stderr and "MissingScriptError" in res.stderr
    assert "error: step self_instruct: MissingScriptError" in res.stderr
    assert {n: list(logging.getLogger(n).handlers) for n in before} == before

    env = {k: os.environ.get(k) for k in ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "MLFLOW_CONFIGURE_LOGGING")}
    res = CliRunner().invoke(app, failing_run_args(tmp_path, "cli-debug"))  # the same, without --debug
    assert res.exit_code == 1 and "Traceback" not in res.stderr, res.stderr
    assert {k: os.environ.get(k) for k in env} == env  # the quiet-logging settings did not outlive the command
    assert {n: list(logging.getLogger(n).handlers) for n in before} == before


def test_preflight_names_a_bad_query_row(tmp_path):
    from autoif.config import load_config

    bad = tmp_path / "q.jsonl"
    bad.write_text('{"query": "a perfectly fine question about gardens"}\n{"text": "no query field"}\n')
    script = tmp_path / "s.jsonl"
    script.write_text('{"prompt": "x", "outputs": ["y"]}\n')
    cfg = load_config(overrides={"queries.path": str(bad), "engine.kind": "scripted",
                                 "engine.scripted_path": str(script)})
    with pytest.raises(PreflightError, match=r"queries\.path: .*q\.jsonl:2: field 'query' must be a string"):
        check(cfg)
    check(cfg, until="consistency_filter")  # a run that stops in stage A does not read queries
