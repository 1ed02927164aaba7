"""Job planning: cutting the calls of one :meth:`Sandbox.run` (functions x inputs, or explicit
pairs) into jobs for the pool. Pure: no processes, no I/O, no threads.

A job is several functions x the same inputs: every function of a job is paired with every input
of it, so a job's processes hold its inputs (and its functions' sources), never another job's.
Each result position of the run is planned exactly once (a pair asked twice is two positions).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(eq=False)
class Job:
    """Several functions x the same inputs."""

    batch: Any  # what collects this run's results (the pool's Batch); the planner only passes it on
    funcs: list[tuple[int, str | None]]  # (function index, source; None: not a str)
    positions: list[Sequence[int]]  # per function: positions in the run's results, aligned with `inputs`
    inputs: list[int]  # input indices
    enc_inputs: list[bytes]  # JSON-encoded inputs by input index (shared by the jobs of one run)

    @property
    def n_calls(self) -> int:
        return len(self.funcs) * len(self.inputs)

    def sub(self, fns: list[int], idx: list[int] | None = None) -> "Job":
        """The same job restricted to functions `fns` (local indices) and input slots `idx`."""
        if idx is None:
            return Job(self.batch, [self.funcs[f] for f in fns], [self.positions[f] for f in fns], self.inputs,
                       self.enc_inputs)
        return Job(self.batch, [self.funcs[f] for f in fns], [[self.positions[f][k] for k in idx] for f in fns],
                   [self.inputs[k] for k in idx], self.enc_inputs)


def plan(
    batch: Any,
    funcs: Sequence[object],
    inputs: Sequence[str],
    pairs: Sequence[tuple[int, int]] | None,
    *,
    workers: int,
    max_job_calls: int,
    max_job_bytes: int,
) -> list[Job]:
    """Cut the calls into jobs: each function's inputs in chunks, then the functions that have
    exactly the same chunk of inputs grouped, several per job (one message and one decode of
    the inputs per job). ``pairs=None`` is the full matrix (position ``i * len(inputs) + j``);
    otherwise position ``k`` is ``pairs[k]``, whose indices must be in range. Biggest jobs first.

    Raises ValueError if a function plus one of its inputs cannot fit in ``max_job_bytes``.
    """
    m = len(inputs)
    by_func: list[tuple[int, Sequence[int], list[int]]] = []  # (func, positions, input indices)
    if pairs is None:
        every = list(range(m))
        by_func = [(i, range(i * m, (i + 1) * m), every) for i in range(len(funcs))]
        used: Sequence[int] = every
        n = len(funcs) * m
    else:
        tmp: dict[int, tuple[list[int], list[int]]] = {}
        for pos, (i, j) in enumerate(pairs):
            e = tmp.get(i)
            if e is None:
                e = tmp[i] = ([], [])
            e[0].append(pos)
            e[1].append(j)
        by_func = [(i, p, ins) for i, (p, ins) in tmp.items()]
        used = sorted({j for _, j in pairs})
        n = len(pairs)
    if n == 0:
        return []
    enc: list[bytes] = [b""] * m
    for j in used:
        enc[j] = json.dumps(inputs[j]).encode()
    src_enc = {i: len(json.dumps(funcs[i])) if isinstance(funcs[i], str) else 4 for i, _, _ in by_func}
    limit = max_job_bytes - 64
    if max(src_enc.values()) + max(len(enc[j]) for j in used) > limit:
        raise ValueError(f"a function plus one input exceeds max_job_bytes={max_job_bytes}")
    per_job = max_job_calls  # input chunk per function
    cuts: dict[int, list[tuple[int, int]]] = {}  # id(input list) -> chunk bounds (shared list: once)
    groups: dict[tuple[int, ...], list[tuple[int, Sequence[int]]]] = {}
    for fi, pos, ins in by_func:
        bounds = cuts.get(id(ins))
        if bounds is None:
            bounds, k = [], 0
            while k < len(ins):  # chunks of at most per_job calls and half the byte limit
                size, e = 0, k
                while e < len(ins) and e - k < per_job and (e == k or size + len(enc[ins[e]]) + 1 <= limit // 2):
                    size += len(enc[ins[e]]) + 1
                    e += 1
                bounds.append((k, e))
                k = e
            cuts[id(ins)] = bounds
        for k, e in bounds:
            key = tuple(ins[k:e])
            groups.setdefault(key, []).append((fi, pos[k:e]))
    # guided self-scheduling: each job takes about 1/(2 x workers) of the calls not yet planned
    # (capped by max_job_calls), so the first jobs are big and the last ones small: few
    # per-job costs, and the pool's last job ends about when the others do
    jobs: list[Job] = []
    remaining = n
    smallest = max(32, math.ceil(n / (8 * workers)))
    for key, members in sorted(groups.items(), key=lambda kv: -len(kv[0]) * len(kv[1])):
        ins = list(key)
        in_bytes = sum(len(enc[j]) + 1 for j in ins)
        cur: list[tuple[int, Sequence[int]]] = []
        size = in_bytes
        cap = 1
        for fi, pos in members:
            if not cur:
                want = min(max_job_calls, max(smallest, math.ceil(remaining / (2 * workers))))
                cap = max(1, want // len(ins))
            elif len(cur) >= cap or size + src_enc[fi] + 1 > limit:
                jobs.append(_job(batch, funcs, cur, ins, enc))
                remaining -= len(cur) * len(ins)
                cur, size = [], in_bytes
                want = min(max_job_calls, max(smallest, math.ceil(remaining / (2 * workers))))
                cap = max(1, want // len(ins))
            cur.append((fi, pos))
            size += src_enc[fi] + 1
        if cur:
            jobs.append(_job(batch, funcs, cur, ins, enc))
            remaining -= len(cur) * len(ins)
    jobs.sort(key=lambda jb: -jb.n_calls)  # big first: better tail balance
    return jobs


def _job(batch: Any, funcs: Sequence[object], members: list[tuple[int, Sequence[int]]], ins: list[int],
         enc: list[bytes]) -> Job:
    return Job(batch, [(fi, funcs[fi] if isinstance(funcs[fi], str) else None) for fi, _ in members],
               [pos for _, pos in members], ins, enc)
