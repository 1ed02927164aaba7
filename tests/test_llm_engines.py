"""Engines against real HTTP: a loopback OpenAI-shaped server that misbehaves on purpose."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from autoif.config import load_config
from autoif.llm import LLM, make_llm
from autoif.llm.openai_http import LLMError, LLMResponseError, LLMTransientError, OpenAIHTTPLLM
from autoif.llm.scripted import MissingScriptError, ScriptedLLM
from tests.conftest import write_script


class FlakyServer:
    """Answers /v1/chat/completions following a per-prompt plan: e.g. ["429", "500", "ok"]."""

    def __init__(self):
        self.plans: dict[str, list[str]] = {}
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                return

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                prompt = body["messages"][0]["content"]
                plan = outer.plans.setdefault(prompt, ["ok"])
                action = plan.pop(0) if len(plan) > 1 else plan[0]
                if action in ("429", "500", "503", "400"):
                    self.send_response(int(action))
                    self.end_headers()
                    self.wfile.write(b'{"error": "nope"}')
                    return
                if action == "llamacpp_like":  # ignores n, wants {"type": "json_object", "schema": ...}
                    if (body.get("response_format") or {}).get("type") == "json_schema":
                        self.send_response(500)
                        self.end_headers()
                        self.wfile.write(b'{"error": "response_format: Input should be json_object"}')
                        return
                    body["n"] = 1
                    prompt = f"{prompt}@{body.get('seed')}"
                if action == "slow":
                    time.sleep(1.5)
                if action == "garbage":
                    payload = b"<html>definitely not json"
                elif action == "wrong_shape":
                    payload = json.dumps({"choices": [{"index": 0, "message": {"content": 42}}]}).encode()
                else:
                    choices = [{"index": i, "message": {"role": "assistant", "content": f"{prompt}#{i}"}} for i in range(body["n"])]
                    payload = json.dumps({"choices": choices, "usage": {"prompt_tokens": 3, "completion_tokens": 5 * body["n"]}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = FlakyServer()
    yield s
    s.close()


def engine(url, **kw):
    return OpenAIHTTPLLM(url, "tiny", **{"backoff_s": 0.01, "timeout_s": 0.5, **kw})


def test_server_side_n_seed_and_schema_are_sent(server):
    llm = engine(server.url)
    out = llm.generate(["a", "b"], n=3, temperature=0.7, max_tokens=9, seed=11, json_schema={"type": "object"})
    assert out == [["a#0", "a#1", "a#2"], ["b#0", "b#1", "b#2"]]
    assert llm.usage.requests == 2 and llm.usage.completions == 6 and llm.usage.completion_tokens == 30
    sent = {b["messages"][0]["content"]: b for b in server.bodies}
    assert sent["a"]["n"] == 3 and sent["a"]["max_tokens"] == 9 and sent["a"]["temperature"] == 0.7
    assert {sent["a"]["seed"], sent["b"]["seed"]} == {11, 14}  # prompts are n seeds apart
    assert sent["a"]["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert isinstance(llm, LLM)


def test_retries_on_429_500_and_slow_then_succeeds(server):
    server.plans = {"p": ["429", "500", "slow", "ok"]}
    llm = engine(server.url, max_retries=5)
    assert llm.generate(["p"]) == [["p#0"]]
    assert llm.usage.retries == 3 and llm.usage.requests == 4
    assert llm.usage.errors == {"http_429": 1, "http_500": 1, "ReadTimeout": 1}


def test_gives_up_after_max_retries_with_transient_error(server):
    server.plans = {"p": ["503"]}
    llm = engine(server.url, max_retries=2)
    with pytest.raises(LLMTransientError, match="3 attempts"):
        llm.generate(["p"])
    assert llm.usage.requests == 3


@pytest.mark.parametrize("action", ["garbage", "wrong_shape"])
def test_garbage_is_rejected_not_retried(server, action):
    server.plans = {"p": [action]}
    llm = engine(server.url)
    with pytest.raises(LLMResponseError, match="p|completion"):
        llm.generate(["p"])
    assert llm.usage.requests == 1 and llm.usage.errors == {"bad_response": 1}


def test_client_error_is_not_retried(server):
    server.plans = {"p": ["400"]}
    llm = engine(server.url)
    with pytest.raises(LLMError, match="HTTP 400"):
        llm.generate(["p"])
    assert llm.usage.requests == 1


def test_connection_refused_is_transient():
    llm = engine("http://127.0.0.1:9/v1", max_retries=1)
    with pytest.raises(LLMTransientError, match="ConnectError"):
        llm.generate(["p"])


def test_concurrency_is_bounded(server):
    server.plans = {f"q{i}": ["slow", "ok"] for i in range(6)}  # first answer of each is slow (timeout)
    llm = engine(server.url, max_concurrency=2, timeout_s=5)
    t = time.perf_counter()
    llm.generate([f"q{i}" for i in range(6)])
    # 6 slow (1.5 s) requests through 2 slots take >= 3 rounds
    assert time.perf_counter() - t >= 4.0


def test_scripted_engine(tmp_path):
    path = write_script(tmp_path / "s.jsonl", [{"prompt": "hello", "outputs": ["a", "b"]}])
    cfg = load_config(overrides={"engine.kind": "scripted", "engine.scripted_path": str(path)})
    llm = make_llm(cfg.engine)
    assert isinstance(llm, ScriptedLLM)
    assert llm.generate(["hello"], n=3) == [["a", "b", "a"]]
    assert llm.usage.prompts == 1
    with pytest.raises(MissingScriptError, match="no canned output .*'goodbye'"):
        llm.generate(["goodbye"])
    assert llm.identity == make_llm(cfg.engine).identity


def test_scripted_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "outputs": "not a list"}\n')
    with pytest.raises(ValueError, match="record 0"):
        ScriptedLLM.from_file(bad)


def test_server_that_ignores_n_and_wants_json_object(server):
    server.plans = {"p": ["llamacpp_like"], "q": ["llamacpp_like"]}
    llm = engine(server.url)
    out = llm.generate(["p", "q"], n=3, temperature=0.8, seed=100, json_schema={"type": "object"})
    # n completions fetched one by one, each with its own seed; schema sent the way the server takes it
    assert out == [["p@100#0", "p@101#0", "p@102#0"], ["q@103#0", "q@104#0", "q@105#0"]]
    assert llm.json_format.value == "json_object" and llm.server_n is False
    assert server.bodies[-1]["response_format"] == {"type": "json_object", "schema": {"type": "object"}}
    assert llm.usage.errors["json_schema_rejected"] >= 1 and "http_500" not in llm.usage.errors


def test_greedy_n_sends_one_request(server):
    llm = engine(server.url)
    assert llm.generate(["g"], n=4, temperature=0.0) == [["g#0"] * 4]
    assert llm.usage.requests == 1 and server.bodies[0]["n"] == 1
