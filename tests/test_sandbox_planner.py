"""autoif.sandbox.planner: how one run is cut into jobs. Pure: no process, thread or I/O here."""
from __future__ import annotations

import json
import os
import subprocess
import threading
from collections import Counter

import pytest

from autoif.sandbox.planner import Job, plan

RUN = object()  # stands for the pool's result collector: the planner only passes it on
DEFAULTS = {"workers": 2, "max_job_calls": 65536, "max_job_bytes": 64 * 1024 * 1024}


def _funcs(n: int) -> list[str]:
    return [f"def evaluate(r):\n    return len(r) > {i}\n" for i in range(n)]


def _inputs(n: int) -> list[str]:
    return [f"response {j}" for j in range(n)]


def calls(jobs: list[Job]) -> list[tuple[int, int, int]]:
    """(result position, function index, input index) of every planned call, checking that each job
    pairs each of its functions with each of its inputs."""
    out = []
    for job in jobs:
        assert len(job.positions) == len(job.funcs)
        for (fi, _src), pos in zip(job.funcs, job.positions):
            assert len(pos) == len(job.inputs)
            out += [(p, fi, ii) for p, ii in zip(pos, job.inputs)]
    return out


@pytest.fixture(autouse=True)
def no_processes(monkeypatch):
    """Planning must not fork, exec or start threads."""
    def refuse(*_a, **_k):
        raise AssertionError("the planner started a process or a thread")

    monkeypatch.setattr(os, "fork", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(threading.Thread, "start", refuse)


def test_full_matrix_plans_every_call_exactly_once_row_major():
    jobs = plan(RUN, _funcs(5), _inputs(7), None, **DEFAULTS)
    assert sorted(calls(jobs)) == [(i * 7 + j, i, j) for i in range(5) for j in range(7)]
    assert all(job.batch is RUN for job in jobs)
    # the jobs carry the sources and the JSON-encoded inputs they need
    for job in jobs:
        assert [src for _, src in job.funcs] == [_funcs(5)[fi] for fi, _ in job.funcs]
        assert [json.loads(job.enc_inputs[j]) for j in job.inputs] == [_inputs(7)[j] for j in job.inputs]


def test_explicit_pairs_position_k_is_pair_k():
    pairs = [(1, 2), (0, 0), (1, 0), (0, 1), (2, 2)]
    jobs = plan(RUN, _funcs(3), _inputs(3), pairs, **DEFAULTS)
    assert sorted(calls(jobs)) == sorted((k, i, j) for k, (i, j) in enumerate(pairs))


def test_duplicate_pairs_are_each_planned_once_per_position():
    pairs = [(1, 2), (0, 0), (1, 2), (1, 2)]
    planned = calls(plan(RUN, _funcs(2), _inputs(3), pairs, **DEFAULTS))
    assert sorted(planned) == [(0, 1, 2), (1, 0, 0), (2, 1, 2), (3, 1, 2)]
    assert Counter(p for p, _, _ in planned) == Counter(range(len(pairs)))


@pytest.mark.parametrize("funcs,inputs,pairs", [
    ([], ["a"], None),
    (["def evaluate(r):\n    return True\n"], [], None),
    (["def evaluate(r):\n    return True\n"], ["a"], []),
])
def test_an_empty_run_plans_no_jobs(funcs, inputs, pairs):
    assert plan(RUN, funcs, inputs, pairs, **DEFAULTS) == []


def test_only_functions_with_the_same_inputs_share_a_job():
    same = plan(RUN, _funcs(2), _inputs(2), [(0, 0), (0, 1), (1, 0), (1, 1)], **DEFAULTS)
    assert len(same) == 1 and [fi for fi, _ in same[0].funcs] == [0, 1]
    # function 0 gets inputs (0, 1), function 1 gets (1, 0): different input lists, different jobs
    apart = plan(RUN, _funcs(2), _inputs(2), [(0, 0), (1, 1), (0, 1), (1, 0)], **DEFAULTS)
    assert len(apart) == 2 and all(len(job.funcs) == 1 for job in apart)


def test_jobs_shrink_toward_the_end_so_the_workers_finish_together():
    n = 200 * 500
    for workers in (1, 2, 8):
        jobs = plan(RUN, _funcs(200), _inputs(500), None, **{**DEFAULTS, "workers": workers})
        sizes = [job.n_calls for job in jobs]
        assert sum(sizes) == n and len(sorted(calls(jobs))) == n
        assert sizes == sorted(sizes, reverse=True)  # biggest first
        # guided self-scheduling: the first job takes about 1/(2 x workers) of the calls
        assert n / (2 * workers) - 500 <= sizes[0] <= n / (2 * workers)
        assert sizes[-1] < sizes[0]
    two = [job.n_calls for job in plan(RUN, _funcs(200), _inputs(500), None, **DEFAULTS)]
    eight = [job.n_calls for job in plan(RUN, _funcs(200), _inputs(500), None, **{**DEFAULTS, "workers": 8})]
    assert len(eight) > len(two) and max(eight) < max(two)


def test_max_job_calls_caps_every_job():
    jobs = plan(RUN, _funcs(3), _inputs(100), None, **{**DEFAULTS, "max_job_calls": 10})
    assert {job.n_calls for job in jobs} == {10} and len(jobs) == 30
    assert sorted(calls(jobs)) == [(i * 100 + j, i, j) for i in range(3) for j in range(100)]


def test_max_job_bytes_splits_big_inputs_and_rejects_what_cannot_fit():
    big = ["x" * 1000 for _ in range(5)]
    jobs = plan(RUN, _funcs(3), big, None, **{**DEFAULTS, "max_job_bytes": 64 + 4000})
    assert all(len(job.inputs) == 1 for job in jobs)  # an input chunk holds at most half the limit
    assert sorted(calls(jobs)) == [(i * 5 + j, i, j) for i in range(3) for j in range(5)]
    with pytest.raises(ValueError, match="max_job_bytes"):
        plan(RUN, _funcs(1), ["x" * 5000], None, **{**DEFAULTS, "max_job_bytes": 64 + 4000})


def test_a_source_that_is_not_a_string_travels_as_null():
    jobs = plan(RUN, [3, "def evaluate(r):\n    return True\n"], ["a"], None, **DEFAULTS)
    (job,) = jobs
    assert job.funcs == [(0, None), (1, "def evaluate(r):\n    return True\n")]


def test_sub_job_keeps_the_run_and_the_alignment():
    (job,) = plan(RUN, _funcs(3), _inputs(4), None, **DEFAULTS)
    part = job.sub([2], [1, 3])
    assert part.batch is RUN and part.enc_inputs is job.enc_inputs
    assert calls([part]) == [(9, 2, 1), (11, 2, 3)]
    assert calls([job.sub([0, 1])]) == [(i * 4 + j, i, j) for i in range(2) for j in range(4)]
