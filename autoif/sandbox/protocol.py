"""The wire between the parent and a worker: one definition, imported by both sides.

All plain JSON, never pickle. Standard library only: this module is also loaded inside the worker
(see ``_worker.py``), so nothing here may import the parent side.

* Worker config: one :class:`WorkerConfig`, built by the parent, serialised as JSON on the
  worker's command line and parsed (type-checked) by the worker.
* Parent -> zygote (fd 0): frames ``FRAME`` (type, job id, payload length) + payload. ``FRAME_JOB``
  carries JSON ``{"funcs": [...], "inputs": [...]}`` (every function paired with every input), at
  most one job ahead of the one running; ``FRAME_KILL`` (no payload) kills the running job.
* Zygote -> parent (fd 1, only trusted code writes it): JSON status lines ``ready``, ``start``,
  ``exit``, ``fatal``, and the job runner's ``fs``/``fe`` lines (function start/end) around
  ``r <json>`` lines that relay what the child running that function reported: either
  ``{"c": detail}`` (compile error) or ``{"s": first call, "o": one outcome code per call,
  "d": {offset: detail}, "end": n}`` (``end`` on the last line of a function). A child only ever
  writes to its own private pipe, so it cannot forge status lines or another function's results.
* Progress page (shared memory, written by the worker, read by the parent's watchdog): two
  int64 slots, the running job's id and the index of the call running now (``PHASE_SETUP``
  while the child compiles the function or runs its module code).
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct

# outcome codes on the wire (single letters keep result lines small)
PASS, FAIL, ERROR, INVALID, COMPILE = "p", "f", "e", "i", "c"
VALID_CODES = frozenset((PASS, FAIL, ERROR, INVALID))  # what a result line may carry

FRAME = struct.Struct(">cII")  # type, job id, payload length
FRAME_JOB, FRAME_KILL = b"J", b"K"

PROGRESS = struct.Struct("<q")
PROGRESS_JOB, PROGRESS_CALL = 0, 8  # byte offsets of the two slots in the progress page
PHASE_SETUP = -1  # progress value while the child compiles the function / runs its module code


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, as one value: built by the parent, parsed by the worker."""

    progress_fd: int  # memfd of the progress page, inherited by the worker
    allowed_modules: tuple[str, ...]
    seccomp: bool  # children load the seccomp filter
    memory_mb: int
    fsize_bytes: int
    nofile: int
    nproc: int
    uid: int  # switched to when the worker starts as root
    gid: int
    detail_chars: int
    timeout_s: float
    flush_interval_s: float
    max_job_bytes: int
    max_output_chars: int
    max_functions_per_child: int
    extra_pure_modules: tuple[str, ...]
    parent_pid: int
    in_bwrap: bool

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WorkerConfig":
        """Parse and type-check; raises ValueError naming the field."""
        raw = json.loads(text)
        if type(raw) is not dict:  # noqa: E721
            raise ValueError("worker config: not a JSON object")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ValueError(f"worker config: unknown field(s) {unknown}")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                raise ValueError(f"worker config: missing field {f.name!r}")
            v, kind = raw[f.name], f.type  # a string: annotations are postponed
            if kind == "tuple[str, ...]" and type(v) is list and all(type(x) is str for x in v):  # noqa: E721
                v = tuple(v)
            elif kind == "float" and type(v) in (int, float):
                v = float(v)
            elif not (kind == "int" and type(v) is int or kind == "bool" and type(v) is bool):  # noqa: E721
                raise ValueError(f"worker config: field {f.name!r} must be {kind}, got {type(v).__name__}")
            values[f.name] = v
        return cls(**values)


# ------------------------------------------------------------------------------------ child result lines
# Built with str operations only (no json module): a function that monkeypatches json for its own
# use must not break how its child reports results.
_JSON_ESC = {i: f"\\u{i:04x}" for i in range(32)}
_JSON_ESC[ord('"')] = '\\"'
_JSON_ESC[ord("\\")] = "\\\\"


def jstr(s: str) -> str:
    """JSON string literal using only built-in str operations (no json module)."""
    return '"' + s.translate(_JSON_ESC) + '"'


def result_line(start: int, codes: str, details: dict, end: int | None = None) -> bytes:
    d = ",".join(f'"{k}":{jstr(v)}' for k, v in details.items())
    tail = f',"end":{end:d}' if end is not None else ""
    return f'{{"s":{start:d},"o":"{codes}","d":{{{d}}}{tail}}}\n'.encode("utf-8", "replace")


def compile_error_line(detail: str) -> bytes:
    return ('{"c":' + jstr(detail) + "}\n").encode("utf-8", "replace")


# ------------------------------------------------------------------------------------ blocking fd I/O (worker side)
def read_exact(fd: int, n: int) -> bytearray | None:
    """n bytes from fd, or None at EOF."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            return None
        got += k
    return buf


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        k = os.write(fd, view)
        view = view[k:]


def read_frame(fd: int) -> tuple[bytes, int, int] | None:
    """(type, job id, payload length) of the next frame header, or None at EOF."""
    head = read_exact(fd, FRAME.size)
    if head is None:
        return None
    typ, jid, n = FRAME.unpack(head)
    if typ not in (FRAME_JOB, FRAME_KILL):
        raise ValueError("bad frame type")
    return typ, jid, n
