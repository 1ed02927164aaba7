"""generate_each's prompt-by-prompt pass, and usage_scope's per-batch accounting on an engine threads share."""
import asyncio
import threading

import pytest

from autoif.llm import (
    LLMContextOverflowError,
    LLMSetupError,
    Usage,
    generate_each,
    usage_scope,
)
from autoif.llm.scripted import ScriptedLLM
from tests.test_llm_engines import FlakyServer, engine


class SeededFake:
    """An engine that, like vLLM in-process, fails a whole batch for one bad prompt and names no prompt.

    Completion j of prompt i is ``f"{prompt}|{seed + i * n + j}"``: the seeds every engine derives.
    """

    def __init__(self, bad: str = "LONG", error: type[Exception] = LLMContextOverflowError):
        self.usage = Usage()
        self.calls: list[tuple[list[str], int | None]] = []
        self.bad, self.error = bad, error

    identity = "fake"

    def generate(self, prompts, n=1, temperature=0.0, max_tokens=512, seed=None, json_schema=None):
        self.calls.append((list(prompts), seed))
        if self.bad in prompts:
            raise self.error(f"{self.bad!r} does not fit")
        return [[f"{p}|{seed + i * n + j}" for j in range(n)] for i, p in enumerate(prompts)]


def test_fallback_keeps_each_prompts_batch_seed():
    llm = SeededFake()
    gens = generate_each(llm, ["a", "LONG", "b"], n=2, seed=10)
    assert gens.errors == [None, "prompt_too_long", None] and gens.texts[1] is None
    assert "does not fit" in gens.details[1]
    # the same completions the batch call gives each prompt when nothing fails
    batch = llm.generate(["a", "x", "b"], n=2, seed=10)
    assert gens.texts[0] == batch[0] == ["a|10", "a|11"] and gens.texts[2] == batch[2] == ["b|14", "b|15"]
    assert llm.calls[:4] == [(["a", "LONG", "b"], 10), (["a"], 10), (["LONG"], 12), (["b"], 14)]


def test_no_fallback_without_a_fault_nor_for_one_prompt():
    llm = SeededFake()
    assert generate_each(llm, ["a", "b"], seed=1).texts == [["a|1"], ["b|2"]]
    gens = generate_each(llm, ["LONG"], seed=1)
    assert gens.errors == ["prompt_too_long"] and len(llm.calls) == 2  # a one-prompt batch is not asked twice


def test_unseeded_fallback_stays_unseeded():
    llm = ScriptedLLM.from_records([{"prompt": "a", "outputs": ["A"]}, {"prompt": "zzz", "error": "prompt_too_long"}])
    gens = generate_each(llm, ["a", "zzz"])
    assert gens.texts == [["A"], None] and gens.errors == [None, "prompt_too_long"]


def test_setup_errors_propagate():
    with pytest.raises(LLMSetupError):
        generate_each(SeededFake(error=LLMSetupError), ["a", "LONG"])


def _run_in_threads(*jobs):
    barrier = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)
    errors: list = []

    def run(k, job):
        try:
            barrier.wait()
            results[k] = job()
        except BaseException as e:  # noqa: BLE001  re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k, job)) for k, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def test_usage_scope_per_thread_on_a_shared_scripted_engine():
    llm = ScriptedLLM.from_prompts({"a": ["A"], "b": ["B"], "c": ["C"]})

    def batch(prompts, n, rounds):
        def job():
            with usage_scope() as u:
                for _ in range(rounds):
                    llm.generate(prompts, n=n)
            return u

        return job

    ua, ub = _run_in_threads(batch(["a", "b"], 3, 200), batch(["c"], 1, 300))
    assert (ua.requests, ua.prompts, ua.completions) == (400, 400, 1200)
    assert (ub.requests, ub.prompts, ub.completions) == (300, 300, 300)
    assert llm.usage.as_dict() == (ua + ub).as_dict()


def test_usage_scope_per_thread_on_a_shared_http_engine():
    server = FlakyServer()
    try:
        # thread A: 3 prompts, each answered only after a 429 (3 retries); thread B calls from inside a running
        # event loop (an async task), which runs the requests on a loop in another thread
        server.plans = {**{f"a{i}": ["429", "ok"] for i in range(3)}, **{f"b{i}": ["ok"] for i in range(4)}}
        llm = engine(server.url, max_retries=3, timeout_s=30)  # no timeouts on a busy machine: exact counts

        def thread_a():
            with usage_scope() as u:
                llm.generate([f"a{i}" for i in range(3)], n=2, temperature=0.5)
            return u

        def thread_b():
            async def in_loop():
                return llm.generate([f"b{i}" for i in range(4)])

            with usage_scope() as outer:
                with usage_scope() as u:
                    asyncio.run(in_loop())
            return u, outer

        ua, (ub, outer) = _run_in_threads(thread_a, thread_b)
    finally:
        server.close()
    assert (ua.requests, ua.retries, ua.prompts, ua.completions) == (6, 3, 3, 6)
    assert ua.prompt_tokens == 9 and ua.completion_tokens == 30 and ua.errors == {"http_429": 3}
    assert (ub.requests, ub.retries, ub.prompts, ub.completions, ub.prompt_tokens) == (4, 0, 4, 4, 12)
    assert outer.as_dict() == ub.as_dict()  # scopes nest: the outer one counts the inner one's calls
    assert llm.usage.as_dict() == (ua + ub).as_dict()


def test_usage_sum_and_metrics():
    a = Usage(requests=2, completions=3, errors={"http_429": 1})
    b = Usage(requests=1, prompt_tokens=5, errors={"http_429": 2, "bad_response": 1})
    total = a + b
    assert (total.requests, total.completions, total.prompt_tokens) == (3, 3, 5)
    assert total.errors == {"http_429": 3, "bad_response": 1} and a.errors == {"http_429": 1}
    m = total.as_metrics()
    assert m["llm_requests"] == 3.0 and m["llm_error_http_429"] == 3.0 and "llm_errors" not in m
