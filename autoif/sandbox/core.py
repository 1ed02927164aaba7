"""Parent side of the sandbox: pool of confined workers, job scheduling and the watchdog.

See ``_worker.py`` for what runs inside a worker. Security layers, strongest mode first:

* ``bwrap_seccomp`` (default when available): each worker is a bubblewrap sandbox (new pid,
  net, ipc, uts and cgroup namespaces; a read-only root that only holds /usr, the Python
  installation, the virtualenv and this package; a private size-limited /tmp; its own /proc;
  a minimal /dev), drops to an unprivileged uid (65534) and rlimits (address space, CPU, file
  size, open files, processes, no core dumps), and runs every job in a forked child that loads a
  seccomp filter denying sockets, exec, fork/clone, kill, ptrace, mounts, namespace changes,
  writable opens and file system changes.
* ``bwrap``: the same without seccomp (``pyseccomp`` missing).
* ``seccomp``: no bubblewrap; uid drop, rlimits and seccomp.
* ``process``: uid drop and rlimits only.
* ``none``: trusted code only; runs in the calling process, no timeout enforcement.

The module allow-list (a guarded ``__import__``) is policy, not a security boundary: Python
introspection can reach other modules. The boundary is the layers above.
"""
from __future__ import annotations

import atexit
import dataclasses
import fcntl
import json
import logging
import math
import mmap
import os
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import threading
import time
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Sequence

from . import _worker

log = logging.getLogger("autoif.sandbox")

WORKER_SCRIPT = Path(_worker.__file__).resolve()

DEFAULT_ALLOWED_MODULES: tuple[str, ...] = (
    "re", "json", "string", "math", "collections", "itertools", "functools", "operator", "unicodedata",
    "textwrap", "difflib", "statistics", "datetime", "calendar", "html", "bisect", "heapq",
    "fractions", "decimal", "typing", "enum", "dataclasses", "copy", "random", "keyword", "numbers",
)


class Outcome(str, Enum):
    passed = "pass"
    failed = "fail"
    error = "error"
    timeout = "timeout"
    killed = "killed"
    invalid_return = "invalid_return"
    compile_error = "compile_error"


class Isolation(str, Enum):
    auto = "auto"
    bwrap_seccomp = "bwrap_seccomp"
    bwrap = "bwrap"
    seccomp = "seccomp"
    process = "process"
    none = "none"


_CODE = {
    _worker.PASS: Outcome.passed,
    _worker.FAIL: Outcome.failed,
    _worker.ERROR: Outcome.error,
    _worker.INVALID: Outcome.invalid_return,
    _worker.COMPILE: Outcome.compile_error,
}


@dataclass(frozen=True)
class CallResult:
    func_index: int
    input_index: int
    outcome: Outcome
    detail: str = ""

    @property
    def value(self) -> bool | None:
        if self.outcome is Outcome.passed:
            return True
        if self.outcome is Outcome.failed:
            return False
        return None


class SandboxError(RuntimeError):
    """The sandbox cannot do what was asked (closed, a requested isolation mode unavailable...)."""


# ------------------------------------------------------------------------------------ environment probes
_probe_lock = threading.Lock()
_probe_cache: dict[str, object] = {}
_warned: set[str] = set()


def _which_bwrap() -> str | None:
    return shutil.which("bwrap")


def _pyseccomp_available() -> bool:
    if "seccomp" not in _probe_cache:
        try:
            import ctypes

            ctypes.CDLL("libseccomp.so.2")
            import importlib.util

            ok = importlib.util.find_spec("pyseccomp") is not None
        except OSError:
            ok = False
        _probe_cache["seccomp"] = ok
    return bool(_probe_cache["seccomp"])


def _bind_roots() -> list[str]:
    """Read-only paths a worker needs: the interpreter, the venv, site-packages, this package."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            paths.add(p)
    paths.add(str(Path(sys.executable).resolve().parent.parent))
    paths.add(str(WORKER_SCRIPT.parent))
    out = []
    for p in sorted({os.path.realpath(p) for p in paths} | paths, key=len):
        if not os.path.isdir(p) or p in ("/", "/usr") or p.startswith("/usr/"):
            continue
        if any(p == q or p.startswith(q + "/") for q in out):
            continue
        out.append(p)
    return out


def _bwrap_argv(bwrap: str, tmp_bytes: int) -> list[str]:
    argv = [
        bwrap,
        "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
        "--die-with-parent", "--new-session",
        "--ro-bind", "/usr", "/usr",
    ]
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        p = "/" + top
        if os.path.islink(p):
            argv += ["--symlink", os.readlink(p), p]
        elif os.path.isdir(p):
            argv += ["--ro-bind", p, p]
    for f in ("/etc/ld.so.cache", "/etc/localtime"):
        argv += ["--ro-bind-try", f, f]
    roots = _bind_roots()
    made: set[str] = {"/", "/usr", "/etc", "/tmp", "/proc", "/dev"}
    for r in roots:
        parts = Path(r).parts
        for i in range(2, len(parts)):
            d = str(Path(*parts[:i]))
            if d not in made:
                argv += ["--perms", "0755", "--dir", d]
                made.add(d)
        argv += ["--ro-bind", r, r]
    argv += [
        "--proc", "/proc", "--dev", "/dev",
        "--perms", "1777", "--size", str(tmp_bytes), "--tmpfs", "/tmp",
        "--chdir", "/tmp", "--remount-ro", "/",
    ]
    return argv


def _warn_once(key: str, message: str) -> None:
    with _probe_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _resolve_isolation(requested: Isolation) -> Isolation:
    bwrap_ok = _which_bwrap() is not None
    sc_ok = _pyseccomp_available()
    if requested is Isolation.auto:
        if bwrap_ok and sc_ok:
            return Isolation.bwrap_seccomp
        missing = [n for n, ok in (("bubblewrap (Debian package `bubblewrap`)", bwrap_ok),
                                   ("seccomp (PyPI `pyseccomp` + libseccomp2)", sc_ok)) if not ok]
        mode = Isolation.bwrap if bwrap_ok else (Isolation.seccomp if sc_ok else Isolation.process)
        _warn_once(
            f"fallback:{mode.value}",
            f"autoif.sandbox: {' and '.join(missing)} not available: generated code runs in the WEAKER "
            f"isolation mode '{mode.value}' (uid drop + rlimits{' + seccomp' if sc_ok else ''}"
            f"{' + bubblewrap' if bwrap_ok else ''}). Install the missing pieces "
            "(infra/install_sandbox_deps.sh) for the secure mode 'bwrap_seccomp'.",
        )
        return mode
    if requested in (Isolation.bwrap_seccomp, Isolation.bwrap) and not bwrap_ok:
        raise SandboxError(f"isolation={requested.value} needs bubblewrap (`bwrap`), which is not installed")
    if requested in (Isolation.bwrap_seccomp, Isolation.seccomp) and not sc_ok:
        raise SandboxError(f"isolation={requested.value} needs pyseccomp and libseccomp, which are not available")
    if requested is Isolation.none:
        _warn_once("none", "autoif.sandbox: isolation=none runs generated code IN-PROCESS with no "
                           "protection and no timeouts; use it only for trusted code.")
    return requested


# ------------------------------------------------------------------------------------ jobs and batches
class _Batch:
    def __init__(self, n: int, n_funcs: int):
        self.results: list[CallResult | None] = [None] * n
        self.remaining = n
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.func_timeouts = [0] * n_funcs
        self.func_dead: dict[int, tuple[Outcome, str]] = {}  # func -> outcome for all its later calls
        self.error: BaseException | None = None
        if n == 0:
            self.done.set()

    def set(self, pos: int, res: CallResult) -> None:
        with self.lock:
            if self.results[pos] is None:
                self.results[pos] = res
                self.remaining -= 1
                if self.remaining == 0:
                    self.done.set()

    def set_many(self, items: list[tuple[int, CallResult]]) -> None:
        with self.lock:
            res = self.results
            for pos, r in items:
                if res[pos] is None:
                    res[pos] = r
                    self.remaining -= 1
            if self.remaining == 0:
                self.done.set()

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc
            self.done.set()


@dataclass
class _Job:
    batch: _Batch
    func_index: int
    src: str
    calls: list[tuple[int, int]]  # (position in results, input index)
    enc_inputs: list[bytes]  # JSON-encoded inputs (shared across jobs of one batch)


class _WorkerDied(Exception):
    pass


class _ProtocolViolation(Exception):
    pass


_PROGRESS = struct.Struct("<q")
_FRAME = _worker.FRAME


@dataclass(eq=False)
class _Run:
    """One attempt of a job on a worker: the calls still to settle and what came back so far."""

    jid: int
    job: _Job
    todo: list[tuple[int, int]]
    sent_at: float
    got: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    compile_err: str | None = None
    started: bool = False
    last_prog: tuple[int, int] = (-1, -99)
    last_change: float = 0.0
    deadline: float = 0.0
    timed_out_at: int | None = None
    kill_sent_at: float | None = None
    violation: str | None = None


class _Worker:
    """One pooled worker process (a zygote, inside bubblewrap when available) and its pipes.

    Protocol (all plain JSON, never pickle): the parent writes frames ``>cII`` (type, job id,
    length) + JSON ``{"src", "inputs"}`` on the worker's stdin, at most one job ahead of the one
    running, and ``K`` frames to kill a running job. The zygote alone writes the worker's stdout:
    JSON status lines (``ready``, ``start``, ``exit``, ``fatal``) and ``r <json>`` lines that relay
    what the current child reported. A child only ever writes to its own private pipe, so it
    cannot forge status or results of another job.
    """

    def __init__(self, sb: "Sandbox", slot: int):
        self.sb = sb
        self.slot = slot
        self.proc: subprocess.Popen | None = None
        self.progress: mmap.mmap | None = None
        self.info: dict = {}
        self.stderr_tail = b""
        self.inflight: list[_Run] = []
        self.wbuf: list[memoryview] = []
        self.next_jid = 1

    # -- lifecycle
    def start(self) -> None:
        sb = self.sb
        pfd = os.memfd_create("autoif-sandbox-progress", os.MFD_CLOEXEC)
        os.ftruncate(pfd, mmap.PAGESIZE)
        os.set_inheritable(pfd, True)
        cfg = {
            "progress_fd": pfd,
            "allowed_modules": list(sb.allowed_modules),
            "seccomp": sb.isolation in (Isolation.bwrap_seccomp, Isolation.seccomp),
            "memory_mb": sb.memory_mb,
            "fsize_bytes": sb.max_file_bytes,
            "nofile": sb.max_open_files,
            "nproc": sb.max_processes,
            "uid": sb.uid,
            "gid": sb.gid,
            "detail_chars": sb.max_detail_chars,
            "timeout_s": sb.timeout_s,
            "flush_interval_s": sb.flush_interval_s,
            "max_job_bytes": sb.max_job_bytes,
            "max_output_chars": sb.max_output_chars,
            "parent_pid": os.getpid(),
            "in_bwrap": sb.isolation in (Isolation.bwrap_seccomp, Isolation.bwrap),
        }
        argv = [sys.executable, "-I", "-B", str(WORKER_SCRIPT), json.dumps(cfg)]
        if cfg["in_bwrap"]:
            argv = _bwrap_argv(sb.bwrap_path, sb.tmp_bytes) + ["--"] + argv
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(pfd,), env=env, cwd="/", start_new_session=True, close_fds=True,
            )
            self.progress = mmap.mmap(pfd, mmap.PAGESIZE)
        finally:
            os.close(pfd)
        self.out_fd = self.proc.stdout.fileno()
        self.err_fd = self.proc.stderr.fileno()
        self.in_fd = self.proc.stdin.fileno()
        for fd in (self.out_fd, self.err_fd, self.in_fd):
            os.set_blocking(fd, False)
        try:
            fcntl.fcntl(self.in_fd, 1031, 1 << 20)  # F_SETPIPE_SZ: fewer wakeups for big jobs
        except OSError:
            pass
        self.rbuf = bytearray()
        self.wbuf = []
        self.inflight = []
        deadline = time.monotonic() + sb.startup_timeout_s
        try:
            while True:
                for m in self._pump(min(0.2, max(0.0, deadline - time.monotonic()))):
                    if isinstance(m, dict) and m.get("t") == "ready":
                        self.info = m
                        if m.get("import_failures"):
                            _warn_once("imports:" + ",".join(m["import_failures"]),
                                       "autoif.sandbox: allowed modules that failed to import in the worker: "
                                       + "; ".join(m["import_failures"]))
                        return
                    if isinstance(m, dict) and m.get("t") == "fatal":
                        raise SandboxError(f"sandbox worker failed to start: {m.get('error')}")
                if time.monotonic() > deadline:
                    raise _WorkerDied("no ready message")
        except (_WorkerDied, _ProtocolViolation) as exc:
            self._drain_stderr()
            err = self.stderr_tail.decode(errors="replace")[-2000:]
            self.kill()
            raise SandboxError(f"sandbox worker did not start (isolation={sb.isolation.value}): {exc}: {err}") from exc
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        # Innermost first: killing bwrap's pid-namespace init tears the namespace down and lets the
        # outer bwrap reap it (the zygote reaps its job child in process mode); killing only the
        # outer process would leave orphans for the host's init to reap.
        kids = _children(proc.pid)
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.monotonic() + 1.0
        while kids and time.monotonic() < deadline:
            kids = [k for k in kids if _alive_child_of(k, proc.pid)]
            if kids:
                time.sleep(0.005)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            proc.kill()
        except OSError:
            pass
        for f in (proc.stdin, proc.stdout, proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not delivered
            log.error("sandbox worker %s did not die after SIGKILL", proc.pid)
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        self.wbuf = []

    def close(self) -> None:
        """Polite shutdown: EOF on stdin makes the zygote exit; then make sure."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    # -- I/O
    def _drain_stderr(self) -> None:
        if self.proc is None:
            return
        while True:
            try:
                chunk = os.read(self.err_fd, 65536)
            except (BlockingIOError, OSError, ValueError):
                return
            if not chunk:
                return
            self.stderr_tail = (self.stderr_tail + chunk)[-4096:]

    def _pump(self, wait_s: float) -> list:
        """One select round: write pending frames, read stdout. Returns parsed messages in order:
        dicts (status) and ("r", bytes) tuples (relayed child results)."""
        fds_w = [self.in_fd] if self.wbuf else []
        try:
            r, w, _ = select.select([self.out_fd, self.err_fd], fds_w, [], max(0.0, wait_s))
        except (OSError, ValueError) as exc:
            raise _WorkerDied(f"select failed: {exc}") from exc
        if w:
            try:
                while self.wbuf:
                    k = os.write(self.in_fd, self.wbuf[0])
                    if k < len(self.wbuf[0]):
                        self.wbuf[0] = self.wbuf[0][k:]
                        break
                    self.wbuf.pop(0)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise _WorkerDied(f"worker closed its input: {exc}") from exc
        if self.err_fd in r:
            self._drain_stderr()
        if self.out_fd not in r:
            return []
        limit = self.sb.max_output_chars + 64
        eof = False
        while True:
            try:
                chunk = os.read(self.out_fd, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                eof = True
                break
            self.rbuf += chunk
            if len(self.rbuf) > 4 * limit:
                break
        out: list = []
        if b"\n" in self.rbuf:
            *lines, rest = bytes(self.rbuf).split(b"\n")
            self.rbuf = bytearray(rest)
            for line in lines:
                if line.startswith(b"r "):
                    out.append(("r", line[2:]))
                elif line:
                    try:
                        out.append(json.loads(line))
                    except ValueError as exc:
                        raise _WorkerDied(f"bad status line from worker: {line[:100]!r}") from exc
        if len(self.rbuf) > limit:
            raise _WorkerDied("worker sent an over-long line")
        if eof:
            out.append({"t": "eof"})
        return out

    # -- jobs
    def submit(self, job: _Job, todo: list[tuple[int, int]] | None = None) -> None:
        if self.proc is None:
            self.start()
        todo = list(job.calls if todo is None else todo)
        body = b"".join(
            [b'{"src":', json.dumps(job.src).encode(), b',"inputs":[',
             b",".join(job.enc_inputs[ii] for _, ii in todo), b"]}"]
        )
        jid = self.next_jid
        self.next_jid += 1
        self.wbuf.append(memoryview(_FRAME.pack(b"J", jid, len(body)) + body))
        self.inflight.append(_Run(jid, job, todo, time.monotonic()))

    def _send_kill(self, run: _Run, now: float) -> None:
        self.wbuf.append(memoryview(_FRAME.pack(b"K", run.jid, 0)))
        run.kill_sent_at = now

    def service(self) -> list[tuple[_Job, list[tuple[int, int]]]]:
        """One round of I/O and watchdog. Returns (job, calls) still to run after kills/deaths."""
        sb = self.sb
        retry: list[tuple[_Job, list[tuple[int, int]]]] = []
        poll = min(0.05, sb.timeout_s / 5)
        try:
            msgs = self._pump(poll)
            now = time.monotonic()
            for m in msgs:
                head = self.inflight[0] if self.inflight else None
                if isinstance(m, tuple):
                    if head is None or not head.started:
                        raise _WorkerDied("results without a running job")
                    self._on_result(head, m[1], now)
                    continue
                t = m.get("t")
                if t == "start":
                    if head is None or head.jid != m.get("j") or head.started:
                        raise _WorkerDied("unexpected start message")
                    head.started = True
                    head.last_change = now
                    head.deadline = now + sb.timeout_s * (len(head.todo) + 2) + 5.0
                elif t == "exit":
                    if head is None or head.jid != m.get("j") or not head.started:
                        raise _WorkerDied("unexpected exit message")
                    self.inflight.pop(0)
                    rest = self._finish(head, m)
                    if rest:
                        retry.append((head.job, rest))
                elif t == "fatal":
                    raise _WorkerDied(f"worker fatal error: {m.get('error')}")
                elif t == "eof":
                    raise _WorkerDied("worker exited")
                else:
                    raise _WorkerDied(f"unknown message {t!r}")
            # watchdog on the running job
            head = self.inflight[0] if self.inflight else None
            if head is not None:
                if head.started and head.kill_sent_at is None:
                    jid = _PROGRESS.unpack_from(self.progress, 0)[0]
                    k = _PROGRESS.unpack_from(self.progress, 8)[0]
                    if jid == head.jid and (jid, k) != head.last_prog:
                        head.last_prog, head.last_change = (jid, k), now
                    if now - head.last_change > sb.timeout_s or now > head.deadline:
                        head.timed_out_at = k if jid == head.jid else None
                        if head.timed_out_at is None:
                            head.timed_out_at = -1
                        self._send_kill(head, now)
                elif head.kill_sent_at is not None and now - head.kill_sent_at > sb.kill_grace_s:
                    raise _WorkerDied("worker did not stop its child after a kill request")
                elif not head.started and now - head.sent_at > sb.startup_timeout_s + sb.timeout_s:
                    raise _WorkerDied("worker did not start the job")
        except (_WorkerDied, _ProtocolViolation) as exc:
            self._drain_stderr()
            log.warning("sandbox worker %d died: %s (stderr: %s)", self.slot, exc,
                        self.stderr_tail.decode(errors="replace")[-500:])
            prog = None
            if self.progress is not None and self.inflight:
                jid = _PROGRESS.unpack_from(self.progress, 0)[0]
                if jid == self.inflight[0].jid:
                    prog = _PROGRESS.unpack_from(self.progress, 8)[0]
            self.kill()
            runs, self.inflight = self.inflight, []
            for i, run in enumerate(runs):
                if i == 0 and run.started:
                    if run.timed_out_at is None and prog is not None:
                        run.last_prog = (run.jid, prog)
                    rest = self._finish(run, {"t": "exit", "worker": str(exc)})
                else:
                    rest = run.todo
                if rest:
                    retry.append((run.job, rest))
        return retry

    def _on_result(self, run: _Run, payload: bytes, now: float) -> None:
        if run.violation is not None:
            return
        sb = self.sb
        try:
            if len(payload) > sb.max_output_chars:
                raise ValueError(f"result message over {sb.max_output_chars} bytes")
            m = json.loads(payload)
            if not isinstance(m, dict):
                raise ValueError("not an object")
            if "c" in m:
                if run.got or run.compile_err is not None:
                    raise ValueError("unexpected compile message")
                run.compile_err = _short(str(m["c"]), sb.max_detail_chars)
                return
            s, codes, det = m["s"], m["o"], m.get("d") or {}
            if type(s) is not int or s != len(run.got) or not isinstance(codes, str) or not isinstance(det, dict):
                raise ValueError("out-of-order results")
            if len(run.got) + len(codes) > len(run.todo):
                raise ValueError("too many results")
            for k, c in enumerate(codes):
                if c not in _CODE or c == _worker.COMPILE:
                    raise ValueError(f"bad outcome code {c[:5]!r}")
                d = det.get(str(k))
                run.got.append((c, _short(str(d), sb.max_detail_chars) if d is not None else ""))
        except (ValueError, KeyError, TypeError) as exc:
            run.violation = _short(str(exc), 200)
            if run.kill_sent_at is None:
                self._send_kill(run, now)

    def _finish(self, run: _Run, m: dict) -> list[tuple[int, int]]:
        """Settle a run that ended; return the calls that still need a run."""
        sb = self.sb
        job, todo, got = run.job, run.todo, run.got
        batch, fi = job.batch, job.func_index
        batch.set_many([(pos, CallResult(fi, ii, _CODE[c], d)) for (pos, ii), (c, d) in zip(todo, got)])
        rest_i = len(got)
        if run.violation is not None:
            for pos, ii in todo[rest_i:]:
                batch.set(pos, CallResult(fi, ii, Outcome.killed, _short(f"protocol violation: {run.violation}")))
            return []
        if run.compile_err is not None:
            batch.func_dead[fi] = (Outcome.compile_error, run.compile_err)
            for pos, ii in todo:
                batch.set(pos, CallResult(fi, ii, Outcome.compile_error, run.compile_err))
            return []
        if rest_i >= len(todo):
            return []
        # the child ended early: which call was running?
        if run.timed_out_at is not None:
            prog = run.timed_out_at
        elif run.last_prog[0] == run.jid:
            prog = run.last_prog[1]
            if self.progress is not None:
                jid = _PROGRESS.unpack_from(self.progress, 0)[0]
                if jid == run.jid:
                    prog = _PROGRESS.unpack_from(self.progress, 8)[0]
        elif self.progress is not None and _PROGRESS.unpack_from(self.progress, 0)[0] == run.jid:
            prog = _PROGRESS.unpack_from(self.progress, 8)[0]
        else:
            prog = rest_i
        in_setup = prog < 0
        k = prog if rest_i <= prog < len(todo) else rest_i
        pos, ii = todo[k]
        if run.timed_out_at is not None:
            if in_setup:
                detail = f"module code or setup exceeded {sb.timeout_s:g}s"
                batch.func_dead[fi] = (Outcome.timeout, detail)
                for p2, i2 in todo[rest_i:]:
                    batch.set(p2, CallResult(fi, i2, Outcome.timeout, detail))
                return []
            batch.set(pos, CallResult(fi, ii, Outcome.timeout, f"exceeded {sb.timeout_s:g}s"))
            with batch.lock:
                batch.func_timeouts[fi] += 1
                n_to = batch.func_timeouts[fi]
            if sb.max_timeouts_per_func is not None and n_to >= sb.max_timeouts_per_func:
                batch.func_dead[fi] = (
                    Outcome.timeout, f"not run: the function already timed out {n_to} times in this batch")
        else:
            detail = _exit_detail(m, sb.max_output_chars)
            if in_setup:
                detail = "while defining evaluate: " + detail
                batch.func_dead[fi] = (Outcome.killed, detail)
                for p2, i2 in todo[rest_i:]:
                    batch.set(p2, CallResult(fi, i2, Outcome.killed, detail))
                return []
            batch.set(pos, CallResult(fi, ii, Outcome.killed, detail))
        return [c for i, c in enumerate(todo) if i >= rest_i and i != k]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


def _alive_child_of(pid: int, parent: int) -> bool:
    """True while pid exists (zombie or not) and is still parent's child."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            st = fh.read().rsplit(")", 1)[1].split()
        return int(st[1]) == parent
    except (OSError, IndexError, ValueError):
        return False


def _short(s: str, n: int = 300) -> str:
    return s if len(s) <= n else s[: max(0, n - 3)] + "..."


def _exit_detail(m: dict | None, max_output: int = 0) -> str:
    if not m:
        return "worker process died"
    if m.get("worker"):
        return _short("worker process died: " + m["worker"])
    if m.get("overflow"):
        return f"output over the {max_output}-byte limit"
    if m.get("sig") is not None:
        sig = m["sig"]
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        extra = {
            signal.SIGKILL: " (memory/resource limit or killed)", signal.SIGXCPU: " (CPU time limit)",
            signal.SIGSEGV: " (crashed)", signal.SIGXFSZ: " (file size limit)", signal.SIGSYS: " (forbidden syscall)",
            signal.SIGABRT: " (aborted)",
        }.get(sig, "")
        return f"terminated by {name}{extra}"
    return f"process exited with status {m.get('code')} during the call"


# ------------------------------------------------------------------------------------ the public class
class Sandbox:
    """A persistent pool of confined workers that run generated ``evaluate(response)`` functions.

    Thread-safe: several threads (e.g. Prefect tasks in a thread pool) may call :meth:`run` at
    once; their jobs share the pool. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        workers: int | None = None,
        timeout_s: float = 1.0,
        isolation: Isolation | str = Isolation.auto,
        allowed_modules: Sequence[str] | None = None,
        memory_mb: int = 512,
        max_output_chars: int = 1_000_000,
        *,
        max_detail_chars: int = 300,
        max_timeouts_per_func: int | None = 3,
        max_job_calls: int = 1024,
        max_job_bytes: int = 64 * 1024 * 1024,
        max_file_bytes: int = 1024 * 1024,
        max_open_files: int = 64,
        max_processes: int | None = None,
        tmp_bytes: int = 16 * 1024 * 1024,
        uid: int = 65534,
        gid: int = 65534,
        flush_interval_s: float = 0.05,
        startup_timeout_s: float = 30.0,
        kill_grace_s: float = 2.0,
    ):
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.isolation = _resolve_isolation(Isolation(isolation))
        self.workers = max(1, int(workers or os.cpu_count() or 1))
        self.timeout_s = float(timeout_s)
        self.allowed_modules = tuple(DEFAULT_ALLOWED_MODULES if allowed_modules is None else allowed_modules)
        self.memory_mb = int(memory_mb)
        self.max_output_chars = int(max_output_chars)
        self.max_detail_chars = int(max_detail_chars)
        self.max_timeouts_per_func = max_timeouts_per_func
        self.max_job_calls = int(max_job_calls)
        self.max_job_bytes = int(max_job_bytes)
        self.max_file_bytes = int(max_file_bytes)
        self.max_open_files = int(max_open_files)
        # RLIMIT_NPROC counts every process of the worker uid: zygotes + one child each + margin
        # (every sandbox on the machine shares it); children cannot fork at all under seccomp
        self.max_processes = int(max_processes or (128 + 4 * self.workers))
        self.tmp_bytes = int(tmp_bytes)
        self.uid, self.gid = int(uid), int(gid)
        self.flush_interval_s = float(flush_interval_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.kill_grace_s = float(kill_grace_s)
        self.bwrap_path = _which_bwrap() or "bwrap"
        if os.getuid() != 0 and self.isolation not in (Isolation.none,):
            _warn_once("nonroot", "autoif.sandbox: not running as root, so workers cannot switch to an "
                                  "unprivileged uid; they keep the caller's uid (rlimits, bwrap and seccomp still apply).")
        self._closed = False
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._workers: list[_Worker] = []
        self._safe_builtins = None
        if self.isolation is not Isolation.none:
            self._workers = [_Worker(self, i) for i in range(self.workers)]
            # Each worker is started (and restarted) by its own long-lived thread: bubblewrap's
            # --die-with-parent and PR_SET_PDEATHSIG fire when the *thread* that forked them exits.
            ready = [threading.Event() for _ in self._workers]
            errors: list[BaseException] = []
            for w, ev in zip(self._workers, ready):
                t = threading.Thread(target=self._loop, args=(w, ev, errors), name=f"autoif-sandbox-{w.slot}",
                                     daemon=True)
                t.start()
                self._threads.append(t)
            for ev in ready:
                ev.wait()
            if errors:
                self.close()
                raise errors[0]

    # -- context manager
    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    @property
    def worker_pids(self) -> list[int]:
        """Host pids of the worker processes (bwrap or zygote), for monitoring and tests."""
        return [w.proc.pid for w in self._workers if w.proc is not None]

    @property
    def worker_info(self) -> list[dict]:
        return [dict(w.info) for w in self._workers]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=30)
        for w in self._workers:
            w.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- work
    def _loop(self, w: _Worker, ready: threading.Event, errors: list) -> None:
        try:
            w.start()
        except BaseException as exc:  # noqa: BLE001 - re-raised by __init__
            errors.append(exc)
            return
        finally:
            ready.set()
        local: list[tuple[_Job, list[tuple[int, int]]]] = []  # retries stay on this slot, first
        stopping = False
        while True:
            try:
                # keep one job running and one queued in the worker (hides the round trip)
                while not stopping and len(w.inflight) < 2 and not any(len(b) > 4096 for b in w.wbuf):
                    if local:
                        job, todo = local.pop(0)
                    else:
                        try:
                            job = self._queue.get(block=not w.inflight)
                        except queue.Empty:
                            break
                        if job is None:
                            stopping = True
                            break
                        todo = job.calls
                    todo = self._settle_dead(job, todo)
                    if todo:
                        w.submit(job, todo)
                if not w.inflight:
                    if stopping:
                        return
                    continue
                retry = w.service()
                local[:0] = retry
            except BaseException as exc:  # noqa: BLE001 - surfaced to the callers of run()
                log.exception("sandbox worker %d failed", w.slot)
                runs, w.inflight = w.inflight, []
                w.kill()
                for run in runs:
                    run.job.batch.fail(exc)
                for job, _todo in local:
                    job.batch.fail(exc)
                local = []

    @staticmethod
    def _settle_dead(job: _Job, todo: list[tuple[int, int]]) -> list[tuple[int, int]]:
        batch = job.batch
        if batch.error is not None or batch.done.is_set():
            return []
        dead = batch.func_dead.get(job.func_index)
        if dead is None:
            return todo
        for pos, ii in todo:
            batch.set(pos, CallResult(job.func_index, ii, dead[0], dead[1]))
        return []

    def run(
        self,
        funcs: Sequence[str],
        inputs: Sequence[str],
        pairs: Sequence[tuple[int, int]] | None = None,
    ) -> list[CallResult]:
        """Run ``evaluate`` of each function on inputs.

        ``pairs=None`` is the full matrix in row-major order (func i, input j); otherwise one result
        per (func index, input index) pair, in pair order.
        """
        if self._closed:
            raise SandboxError("sandbox is closed")
        funcs = list(funcs)
        inputs = list(inputs)
        for j, s in enumerate(inputs):
            if not isinstance(s, str):
                raise TypeError(f"inputs[{j}] is {type(s).__name__}, expected str")
        if pairs is None:
            pairs_l = [(i, j) for i in range(len(funcs)) for j in range(len(inputs))]
        else:
            pairs_l = [(int(i), int(j)) for i, j in pairs]
            for i, j in pairs_l:
                if not (0 <= i < len(funcs)) or not (0 <= j < len(inputs)):
                    raise IndexError(f"pair ({i}, {j}) out of range ({len(funcs)} funcs, {len(inputs)} inputs)")
        batch = _Batch(len(pairs_l), len(funcs))
        if not pairs_l:
            return []
        if self.isolation is Isolation.none:
            return self._run_inprocess(funcs, inputs, pairs_l)
        by_func: dict[int, list[tuple[int, int]]] = {}
        for pos, (i, j) in enumerate(pairs_l):
            by_func.setdefault(i, []).append((pos, j))
        enc: list[bytes] = [b""] * len(inputs)
        for j in {j for _, j in pairs_l}:
            enc[j] = json.dumps(inputs[j]).encode()
        biggest_src = max((len(json.dumps(funcs[i])) for i in by_func), default=0)
        biggest_inp = max((len(enc[j]) for _, j in pairs_l), default=0)
        if biggest_src + biggest_inp + 64 > self.max_job_bytes:
            raise ValueError(f"a function plus one input exceeds max_job_bytes={self.max_job_bytes}")
        # chunks small enough to balance the pool, large enough to amortise the fork per job
        chunk = max(min(32, self.max_job_calls), min(self.max_job_calls, math.ceil(len(pairs_l) / (self.workers * 2))))
        jobs = []
        for i, calls in by_func.items():
            src = funcs[i]
            for k in range(0, len(calls), chunk):
                jobs.append(_Job(batch, i, src if isinstance(src, str) else None, calls[k:k + chunk], enc))
        jobs.sort(key=lambda jb: -len(jb.calls))  # big first: better tail balance
        for jb in jobs:
            self._queue.put(jb)
        while not batch.done.wait(0.5):
            if self._closed:
                batch.fail(SandboxError("sandbox closed during run"))
        if batch.error is not None:
            raise SandboxError(f"sandbox run failed: {batch.error}") from batch.error
        return batch.results  # type: ignore[return-value]

    def _run_inprocess(self, funcs: list[str], inputs: list[str], pairs: list[tuple[int, int]]) -> list[CallResult]:
        if self._safe_builtins is None:
            self._safe_builtins = _worker.make_builtins(frozenset(self.allowed_modules))
        compiled: dict[int, tuple[object, str | None]] = {}
        out: list[CallResult] = []
        for i, j in pairs:
            if i not in compiled:
                compiled[i] = _worker.compile_function(funcs[i], self._safe_builtins, self.max_detail_chars)
            fn, err = compiled[i]
            if fn is None:
                out.append(CallResult(i, j, Outcome.compile_error, err or ""))
                continue
            (code, detail), = _worker.run_calls(fn, [inputs[j]], self.max_detail_chars)
            out.append(CallResult(i, j, _CODE[code], detail))
        return out


# ------------------------------------------------------------------------------------ one pool per process
_shared: Sandbox | None = None
_shared_key: tuple | None = None
_shared_lock = threading.Lock()
_shared_pid: int | None = None


def shared_sandbox(**kwargs) -> Sandbox:
    """The process-wide pool: created on first use, reused by every later call (e.g. each Prefect
    task run in this process), closed at interpreter exit. Calling it with different settings
    replaces the pool (the old one is closed)."""
    global _shared, _shared_key, _shared_pid
    key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
    with _shared_lock:
        if _shared is not None and _shared_pid != os.getpid():  # forked: the pool belongs to the parent
            _shared = None
        if _shared is not None and (_shared.closed or _shared_key != key):
            _shared.close()
            _shared = None
        if _shared is None:
            _shared = Sandbox(**kwargs)
            _shared_key = key
            _shared_pid = os.getpid()
        return _shared


def close_shared_sandbox() -> None:
    global _shared
    with _shared_lock:
        if _shared is not None and _shared_pid == os.getpid():
            _shared.close()
        _shared = None


atexit.register(close_shared_sandbox)
