"""Engines against real HTTP: a loopback OpenAI-shaped server that misbehaves on purpose."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from autoif.config import load_config
from autoif.llm import (
    LLM,
    LLMContextOverflowError,
    LLMError,
    LLMRefusedError,
    LLMRequestError,
    LLMResponseError,
    LLMSetupError,
    LLMTransientError,
    MissingScriptError,
    generate_each,
    make_llm,
)
from autoif.llm.openai_http import OpenAIHTTPLLM
from autoif.llm.scripted import ScriptedLLM
from tests.conftest import write_script

# Error answers as the real servers send them (status, body).
ERROR_ANSWERS = {
    # llama.cpp's server (llama-server), prompt longer than its context
    "llamacpp_ctx": (400, {"error": {"code": 400, "message": "request (4476 tokens) exceeds the available context size (4096 tokens)",
                                     "type": "exceed_context_size_error", "n_prompt_tokens": 4476, "n_ctx": 4096}}),
    # vLLM 0.32's OpenAI server (vllm/renderers/params.py), prompt longer than max_model_len
    "vllm_ctx": (400, {"error": {"message": "This model's maximum context length is 2048 tokens. However, your prompt contains 3000 "
                                            "input tokens, which exceeds this limit even without any output tokens. Please reduce the "
                                            "length of the input prompt. (parameter=input_tokens, value=3000)",
                                 "type": "BadRequestError", "param": "input_tokens", "code": 400}}),
    # vLLM 0.32's engine-side check, as its server passes it on
    "vllm_engine_ctx": (400, {"error": {"message": "The decoder prompt (length 3000) is longer than the maximum model length of 2048. "
                                                   "Make sure that `max_model_len` is no smaller than the number of text tokens.",
                                        "type": "BadRequestError", "param": None, "code": 400}}),
    "401": (401, {"error": {"message": "Invalid API key", "type": "invalid_request_error"}}),
    "404": (404, {"error": {"message": "The model `tiny` does not exist.", "type": "NotFoundError", "code": 404}}),
    # llama-cpp-python's server (llama_cpp/server/errors.py) for a model name it does not serve
    "llamacpp_py_model": (400, {"error": {"message": "The model `tiny` does not exist", "type": "invalid_request_error",
                                          "param": None, "code": "model_not_found"}}),
    # llama-cpp-python's server for "Requested tokens (N) exceed context window of M"
    "llamacpp_py_ctx": (400, {"error": {"message": "This model's maximum context length is 256 tokens. However, you requested 2515 "
                                                   "tokens (2003 in the messages, 512 in the completion). Please reduce the length of "
                                                   "the messages or completion.", "type": "invalid_request_error",
                                        "param": "messages", "code": "context_length_exceeded"}}),
    "422": (422, {"error": {"message": "messages: field required", "type": "UnprocessableEntityError"}}),
}


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
                if action in ERROR_ANSWERS:
                    status, answer = ERROR_ANSWERS[action]
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(json.dumps(answer).encode())
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
    with pytest.raises(LLMTransientError, match="3 attempts") as info:
        llm.generate(["p"])
    assert not isinstance(info.value, LLMRequestError)
    assert llm.usage.requests == 3


@pytest.mark.parametrize("action", ["garbage", "wrong_shape"])
def test_garbage_is_rejected_not_retried(server, action):
    server.plans = {"p": [action]}
    llm = engine(server.url)
    with pytest.raises(LLMResponseError, match="p|completion") as info:
        llm.generate(["p"])
    assert info.value.reason == "malformed_answer" and info.value.prompt_index == 0
    assert llm.usage.requests == 1 and llm.usage.errors == {"bad_response": 1}


@pytest.mark.parametrize("action", ["400", "422"])
def test_client_error_is_refused_not_retried(server, action):
    server.plans = {"p": [action]}
    llm = engine(server.url, timeout_s=30)
    with pytest.raises(LLMRefusedError, match=f"HTTP {action}") as info:
        llm.generate(["p"])
    assert not isinstance(info.value, LLMContextOverflowError)
    assert info.value.reason == "request_refused" and info.value.prompt_index == 0
    assert llm.usage.requests == 1


@pytest.mark.parametrize("action", ["llamacpp_ctx", "llamacpp_py_ctx", "vllm_ctx", "vllm_engine_ctx"])
def test_context_overflow_is_one_class_whichever_server_says_it(server, action):
    server.plans = {"ok": ["ok"], "long": [action]}
    llm = engine(server.url, timeout_s=30)
    with pytest.raises(LLMContextOverflowError, match="HTTP 400") as info:
        llm.generate(["ok", "long"])
    e = info.value
    assert e.reason == "prompt_too_long" and e.prompt_index == 1 and str(e).startswith("prompt 1: ")
    assert llm.usage.requests == 2 and llm.usage.retries == 0  # not retried
    # the other prompt of the batch was answered, and rides on the error
    assert e.outcomes is not None and e.outcomes[0] == ["ok#0"] and e.outcomes[1] is e


@pytest.mark.parametrize("action", ["401", "404", "llamacpp_py_model"])
def test_wrong_key_or_model_is_a_setup_error(server, action):
    server.plans = {"p": [action]}
    llm = engine(server.url, timeout_s=30)
    with pytest.raises(LLMSetupError, match="HTTP 40"):
        llm.generate(["p"])


def test_missing_base_url_is_a_setup_error():
    cfg = load_config(overrides={"engine.kind": "openai"})
    assert not cfg.engine.base_url
    with pytest.raises(LLMSetupError, match="base_url"):
        make_llm(cfg.engine)


def test_connection_refused_is_transient():
    llm = engine("http://127.0.0.1:9/v1", max_retries=1)
    with pytest.raises(LLMTransientError, match="ConnectError"):
        llm.generate(["p"])


def test_generate_each_keeps_the_batch_when_one_prompt_overflows(server):
    server.plans = {"a": ["ok"], "long": ["vllm_ctx"], "b": ["ok"], "junk": ["garbage"], "no": ["400"]}
    llm = engine(server.url, timeout_s=30)
    prompts = ["a", "long", "b", "junk", "no"]
    gens = generate_each(llm, prompts, n=2, temperature=0.5, seed=7)
    assert gens.texts == [["a#0", "a#1"], None, ["b#0", "b#1"], None, None]
    assert gens.errors == [None, "prompt_too_long", None, "malformed_answer", "request_refused"]
    assert gens.details[0] is None and "maximum context length" in gens.details[1] and len(gens.details[1]) <= 300
    # every prompt was sent once, with the seed it has in the batch (seed + i * n): nothing was asked twice
    seeds = {b["messages"][0]["content"]: b["seed"] for b in server.bodies}
    assert len(server.bodies) == len(prompts) and seeds == {"a": 7, "long": 9, "b": 11, "junk": 13, "no": 15}


def test_generate_each_lets_transient_errors_through(server):
    server.plans = {"a": ["ok"], "long": ["llamacpp_ctx"], "down": ["503"]}
    llm = engine(server.url, max_retries=1)
    with pytest.raises(LLMTransientError):  # the task retries; no row is given up on a transient fault
        generate_each(llm, ["a", "long", "down"])


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
    with pytest.raises(MissingScriptError, match="no canned output .*'goodbye'") as info:
        llm.generate(["goodbye"])
    assert not isinstance(info.value, LLMRequestError)  # an incomplete script fails the step, never a quiet drop
    assert llm.identity == make_llm(cfg.engine).identity


def test_scripted_generate_each_fails_on_a_prompt_without_canned_output():
    llm = ScriptedLLM.from_prompts({"a": ["A1", "A2"], "c": ["C"]})
    with pytest.raises(MissingScriptError, match="sha256="):
        generate_each(llm, ["a", "b", "c"], n=2, seed=3)

def test_scripted_canned_errors_fail_like_a_real_engine(tmp_path):
    path = write_script(tmp_path / "s.jsonl", [
        {"prompt": "ok", "outputs": ["fine"]},
        {"prompt": "long", "error": "prompt_too_long"},
        {"prompt": "junk", "error": "malformed_answer"},
        {"prompt": "no", "error": "request_refused"},
        {"prompt": "busy", "error": "transient"},
        {"prompt": "broken", "error": "engine_failure"},
    ])
    llm = ScriptedLLM.from_file(path)
    gens = generate_each(llm, ["ok", "long", "junk", "no"])
    assert gens.texts == [["fine"], None, None, None]
    assert gens.errors == [None, "prompt_too_long", "malformed_answer", "request_refused"]
    with pytest.raises(LLMTransientError):
        generate_each(llm, ["ok", "busy"])
    with pytest.raises(LLMError) as info:
        generate_each(llm, ["broken", "ok"])
    assert type(info.value) is LLMError  # neither retried nor a row's reason
    assert llm.usage.errors == {"prompt_too_long": 1, "malformed_answer": 1, "request_refused": 1, "transient": 1, "engine_failure": 1}
    assert llm.identity != ScriptedLLM.from_records([{"prompt": "ok", "outputs": ["fine"]}]).identity
    with pytest.raises(LLMSetupError, match="'error' must be one of"):
        ScriptedLLM.from_records([{"prompt": "x", "error": "oops"}])


def test_scripted_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "outputs": "not a list"}\n')
    with pytest.raises(LLMSetupError, match="record 0"):
        ScriptedLLM.from_file(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "x", "outputs": ["a"]\n')
    with pytest.raises(LLMSetupError, match="not valid JSON"):
        ScriptedLLM.from_file(broken)
    with pytest.raises(LLMSetupError, match="cannot read"):
        ScriptedLLM.from_file(tmp_path / "absent.jsonl")
    with pytest.raises(LLMSetupError, match="scripted_path"):
        ScriptedLLM.from_file(None)


def test_errors_survive_pickling():
    """Prefect pickles a failed task's exception: class, reason and prompt survive; the batch's outcomes do not."""
    import pickle

    e = LLMContextOverflowError("too long", prompt_index=3)
    e.outcomes = [["x"] * 1000, e]
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is LLMContextOverflowError and str(back) == str(e) == "prompt 3: too long"
    assert back.reason == "prompt_too_long" and back.prompt_index == 3 and back.outcomes is None
    assert isinstance(back, LLMError) and isinstance(back, RuntimeError)


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
