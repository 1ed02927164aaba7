"""Parent side of the sandbox: pool of confined workers, job scheduling and the watchdog.

See ``_worker.py`` for what runs inside a worker. Security layers, strongest mode first:

* ``bwrap_seccomp`` (default when available): each worker is a bubblewrap sandbox (new pid,
  net, ipc, uts and cgroup namespaces; a read-only root that only holds /usr, the Python
  installation, the virtualenv and this package; a private size-limited /tmp; its own /proc;
  a minimal /dev), drops to an unprivileged uid (65534) and rlimits (address space, CPU, file
  size, open files, processes, no core dumps), and runs the functions in forked children that load
  a seccomp filter denying sockets, exec, fork/clone, kill, ptrace, mounts, namespace changes,
  writable opens and file system changes. A child runs several functions of a job (same inputs)
  in a row only after functions that provably cannot leave state behind (``_purity.py``: static
  check + dynamic check); any other function is the last one its child runs.
* ``bwrap``: the same without seccomp (``pyseccomp`` missing).
* ``seccomp``: no bubblewrap; uid drop, rlimits and seccomp.
* ``process``: uid drop and rlimits only.
* ``none``: trusted code only; runs in the calling process, no timeout enforcement.

The module allow-list (a guarded ``__import__``) is policy, not a security boundary: Python
introspection can reach other modules. The boundary is the layers above.
"""
from __future__ import annotations

import atexit
import contextlib
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
    # the private /tmp first: a checkout or venv that lives under the host's /tmp is bound on top of it,
    # not hidden by it (bwrap applies mounts in argument order)
    argv += ["--perms", "1777", "--size", str(tmp_bytes), "--tmpfs", "/tmp"]
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


@dataclass(eq=False)
class _Job:
    """Several functions x the same inputs. Every function of a job is paired with every input of
    it: a job's processes hold its inputs (and its functions' sources), never another job's."""

    batch: _Batch
    funcs: list[tuple[int, str | None]]  # (function index, source)
    positions: list[Sequence[int]]  # per function: positions in the batch results, aligned with `inputs`
    inputs: list[int]  # input indices
    enc_inputs: list[bytes]  # JSON-encoded inputs (shared across jobs of one batch)

    @property
    def n_calls(self) -> int:
        return len(self.funcs) * len(self.inputs)

    def sub(self, fns: list[int], idx: list[int] | None = None) -> "_Job":
        """The same job restricted to functions `fns` (local indices) and input slots `idx`."""
        if idx is None:
            return _Job(self.batch, [self.funcs[f] for f in fns], [self.positions[f] for f in fns], self.inputs,
                        self.enc_inputs)
        return _Job(self.batch, [self.funcs[f] for f in fns], [[self.positions[f][k] for k in idx] for f in fns],
                    [self.inputs[k] for k in idx], self.enc_inputs)


class _WorkerDied(Exception):
    pass


class _ProtocolViolation(Exception):
    pass


_PROGRESS = struct.Struct("<q")
_FRAME = _worker.FRAME
_VALID_CODES = frozenset((_worker.PASS, _worker.FAIL, _worker.ERROR, _worker.INVALID))


@dataclass(eq=False)
class _Run:
    """One attempt of a job on a worker. The job runner starts one child per function, in order;
    `cur` is the function whose child runs now (known from the trusted job runner's messages)."""

    jid: int
    job: _Job
    sent_at: float
    started: bool = False
    cur: int | None = None  # local index of the function whose child runs now
    next_fn: int = 0  # local index of the next function the job runner will start
    got: int = 0  # results received for the current function
    compile_err: str | None = None
    last_prog: tuple[int, int] = (-1, -99)
    last_change: float = 0.0
    deadline: float = 0.0
    timed_out_at: int | None = None
    kill_fn: int | None = None  # the function that was running when the watchdog asked for a kill
    kill_sent_at: float | None = None
    violation: str | None = None


class _Worker:
    """One pooled worker process (a zygote, inside bubblewrap when available) and its pipes.

    Protocol (all plain JSON, never pickle): the parent writes frames ``>cII`` (type, job id,
    length) + JSON ``{"funcs", "inputs"}`` on the worker's stdin, at most one job ahead of the one
    running, and ``K`` frames to kill a running job. Only trusted code writes the worker's stdout:
    the zygote's JSON status lines (``ready``, ``start``, ``exit``, ``fatal``) and the job
    runner's lines, ``fs``/``fe`` (function start/end, JSON) around ``r <json>`` lines that relay
    what the child running that function reported. A child only ever writes to its own private
    pipe, so it cannot forge status lines or the results of another function.
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
        self.stats = {"fresh": 0, "reused": 0}  # functions started in a fresh / a reused child

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
            "max_functions_per_child": sb.max_functions_per_child,
            "extra_pure_modules": list(sb._extra_pure_modules),
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
        except OSError as exc:  # only a hint (EPERM: over fs.pipe-max-size or the user's pipe quota)
            log.debug("sandbox worker %d: F_SETPIPE_SZ refused, keeping the default pipe size: %s", self.slot, exc)
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
            with contextlib.suppress(ProcessLookupError):  # exited since the listing
                os.kill(k, signal.SIGKILL)
        deadline = time.monotonic() + 1.0
        while kids and time.monotonic() < deadline:
            kids = [k for k in kids if _alive_child_of(k, proc.pid)]
            if kids:
                time.sleep(0.005)
        with contextlib.suppress(ProcessLookupError):  # the whole group has exited and been reaped
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):  # already gone
            proc.kill()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(BrokenPipeError):  # stdin: flushing to a worker that is gone
                f.close()
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
        with contextlib.suppress(BrokenPipeError):  # the worker is already gone: kill() below cleans up
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):  # did not exit in time: kill() below makes sure
            self.proc.wait(timeout=2)
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
                with contextlib.suppress(BlockingIOError):  # pipe full: the rest goes out next round
                    while self.wbuf:
                        k = os.write(self.in_fd, self.wbuf[0])
                        if k < len(self.wbuf[0]):
                            self.wbuf[0] = self.wbuf[0][k:]
                            break
                        self.wbuf.pop(0)
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
    def submit(self, job: _Job) -> None:
        if self.proc is None:
            self.start()
        enc = job.enc_inputs
        body = b"".join(
            [b'{"funcs":[', b",".join(json.dumps(src).encode() for _, src in job.funcs), b'],"inputs":[',
             b",".join([enc[ii] for ii in job.inputs]), b"]}"]
        )
        jid = self.next_jid
        self.next_jid += 1
        self.wbuf.append(memoryview(_FRAME.pack(b"J", jid, len(body)) + body))
        self.inflight.append(_Run(jid, job, time.monotonic()))

    def _send_kill(self, run: _Run, now: float) -> None:
        self.wbuf.append(memoryview(_FRAME.pack(b"K", run.jid, 0)))
        run.kill_sent_at = now

    def _page(self) -> tuple[int, int] | None:
        if self.progress is None:
            return None
        return _PROGRESS.unpack_from(self.progress, 0)[0], _PROGRESS.unpack_from(self.progress, 8)[0]

    def service(self) -> list[_Job]:
        """One round of I/O and watchdog. Returns jobs still to run after kills/deaths."""
        sb = self.sb
        retry: list[_Job] = []
        poll = min(0.05, sb.timeout_s / 5)
        try:
            msgs = self._pump(poll)
            now = time.monotonic()
            for m in msgs:
                head = self.inflight[0] if self.inflight else None
                if isinstance(m, tuple):
                    if head is None or head.cur is None:
                        raise _WorkerDied("results without a running function")
                    self._on_result(head, m[1], now)
                    continue
                t = m.get("t")
                if t == "fs":
                    if head is None or not head.started or head.cur is not None or m.get("i") != head.next_fn \
                            or head.next_fn >= len(head.job.funcs):
                        raise _WorkerDied("unexpected function start")
                    head.cur = head.next_fn
                    head.next_fn += 1
                    self.stats["fresh" if m.get("new", True) else "reused"] += 1
                    head.got = 0
                    head.compile_err = None
                    head.last_prog = (-1, -99)
                    head.last_change = now
                elif t == "fe":
                    if head is None or head.cur is None or m.get("i") != head.cur:
                        raise _WorkerDied("unexpected function end")
                    retry += self._finish_fn(head, m)
                    head.cur = None
                    head.last_change = now
                elif t == "start":
                    if head is None or head.jid != m.get("j") or head.started:
                        raise _WorkerDied("unexpected start message")
                    head.started = True
                    head.last_change = now
                    head.deadline = now + sb.timeout_s * (head.job.n_calls + 2 * len(head.job.funcs)) + 5.0
                elif t == "exit":
                    if head is None or head.jid != m.get("j") or not head.started:
                        raise _WorkerDied("unexpected exit message")
                    self.inflight.pop(0)
                    retry += self._finish_run(head, m)
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
                    if head.cur is not None:
                        jid, k = self._page()
                        if jid == head.jid and (head.cur, k) != head.last_prog:
                            head.last_prog, head.last_change = (head.cur, k), now
                        if now - head.last_change > sb.timeout_s or now > head.deadline:
                            head.timed_out_at = k if jid == head.jid else _worker.PHASE_SETUP
                            head.kill_fn = head.cur
                            self._send_kill(head, now)
                    elif now - head.last_change > sb.startup_timeout_s + sb.timeout_s or now > head.deadline:
                        self._send_kill(head, now)  # the job runner itself is stuck (should not happen)
                elif head.kill_sent_at is not None and now - head.kill_sent_at > sb.kill_grace_s:
                    raise _WorkerDied("worker did not stop its job after a kill request")
                elif not head.started and now - head.sent_at > sb.startup_timeout_s + sb.timeout_s:
                    raise _WorkerDied("worker did not start the job")
        except (_WorkerDied, _ProtocolViolation) as exc:
            self._drain_stderr()
            log.warning("sandbox worker %d died: %s (stderr: %s)", self.slot, exc,
                        self.stderr_tail.decode(errors="replace")[-500:])
            page = self._page()
            self.kill()
            runs, self.inflight = self.inflight, []
            for i, run in enumerate(runs):
                if i == 0 and run.started:
                    if run.cur is not None and run.timed_out_at is None and page is not None and page[0] == run.jid:
                        run.last_prog = (run.cur, page[1])
                    retry += self._finish_run(run, {"t": "exit", "worker": str(exc)}, page_ok=False)
                else:
                    retry.append(run.job.sub(list(range(run.next_fn, len(run.job.funcs)))) if run.next_fn else run.job)
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
            if type(s) is not int or s != run.got or type(codes) is not str or not isinstance(det, dict):
                raise ValueError("out-of-order results")
            if run.compile_err is not None:
                raise ValueError("results after a compile error")
            job = run.job
            if s + len(codes) > len(job.inputs):
                raise ValueError("too many results")
            if not _VALID_CODES.issuperset(codes):
                raise ValueError(f"bad outcome code in {codes[:20]!r}")
            dets: dict[int, str] = {}
            for key, d in det.items():
                k = int(key)
                if not 0 <= k < len(codes):
                    raise ValueError("detail for a call outside the message")
                dets[k] = _short(str(d), sb.max_detail_chars)
            self._settle_codes(run, s, codes, dets)
            run.got = s + len(codes)
        except (ValueError, KeyError, TypeError) as exc:
            run.violation = _short(str(exc), 200)
            if run.kill_sent_at is None:
                run.kill_fn = run.cur
                self._send_kill(run, now)

    @staticmethod
    def _settle_codes(run: _Run, s: int, codes: str, dets: dict[int, str]) -> None:
        """Record results s.. of the current function (the hot path: one CallResult per call)."""
        job = run.job
        batch = job.batch
        fi = job.funcs[run.cur][0]
        pos, inp, out = job.positions[run.cur], job.inputs, _CODE
        res = batch.results
        new, setattr_, cls = object.__new__, object.__setattr__, CallResult
        n = 0
        with batch.lock:
            for k, c in enumerate(codes, s):
                p = pos[k]
                if res[p] is None:
                    # what the frozen dataclass's __init__ does, without its call frame
                    r = new(cls)
                    setattr_(r, "func_index", fi)
                    setattr_(r, "input_index", inp[k])
                    setattr_(r, "outcome", out[c])
                    setattr_(r, "detail", dets.get(k - s, "") if dets else "")
                    res[p] = r
                    n += 1
            batch.remaining -= n
            if batch.remaining == 0:
                batch.done.set()

    def _finish_run(self, run: _Run, m: dict, page_ok: bool = True) -> list[_Job]:
        """Settle a run whose job runner ended; return the jobs that still need a run."""
        retry: list[_Job] = []
        job = run.job
        if run.cur is not None:  # the job runner died with a child running (killed by the watchdog?)
            retry += self._finish_fn(run, m, page_ok=page_ok)
            run.cur = None
        rest = list(range(run.next_fn, len(job.funcs)))
        if not rest:
            return retry
        if run.kill_sent_at is None or m.get("worker") or run.kill_fn is None:
            # the job runner itself failed before starting these functions: charge the first one so
            # that every run makes progress, retry the others
            fi = job.funcs[rest[0]][0]
            detail = "job runner failed: " + _exit_detail(m, self.sb.max_output_chars)
            job.batch.set_many([(p, CallResult(fi, ii, Outcome.killed, _short(detail)))
                                for p, ii in zip(job.positions[rest[0]], job.inputs)])
            rest = rest[1:]
        if rest:
            retry.append(job.sub(rest))
        return retry

    def _finish_fn(self, run: _Run, m: dict, page_ok: bool = False) -> list[_Job]:
        """Settle the current function of a run after its child ended; return what must run again."""
        sb = self.sb
        job, fl = run.job, run.cur
        fi = job.funcs[fl][0]
        pos, inputs, batch = job.positions[fl], job.inputs, job.batch
        n, got = len(inputs), run.got
        if run.violation is not None:
            detail = _short(f"protocol violation: {run.violation}")
            batch.set_many([(pos[k], CallResult(fi, inputs[k], Outcome.killed, detail)) for k in range(got, n)])
            return []
        if run.compile_err is not None:
            batch.func_dead[fi] = (Outcome.compile_error, run.compile_err)
            batch.set_many([(pos[k], CallResult(fi, inputs[k], Outcome.compile_error, run.compile_err))
                            for k in range(n)])
            return []
        if got >= n:
            return []
        # the child ended early: which call was running?
        ours = run.kill_sent_at is not None and run.kill_fn == fl
        if run.kill_sent_at is not None and not ours:
            # a kill meant for an earlier function of the job arrived late: not this function's fault
            return [job.sub([fl], list(range(got, n)))]
        if ours:
            prog = run.timed_out_at if run.timed_out_at is not None else got
        elif type(m.get("k")) is int:
            prog = m["k"]  # read by the job runner right after the child ended
        elif page_ok and self._page() is not None and self._page()[0] == run.jid:
            prog = self._page()[1]
        elif run.last_prog[0] == fl:
            prog = run.last_prog[1]
        else:
            prog = got
        in_setup = prog < 0
        k = prog if got <= prog < n else got
        if ours:
            if in_setup:
                detail = f"module code or setup exceeded {sb.timeout_s:g}s"
                batch.func_dead[fi] = (Outcome.timeout, detail)
                batch.set_many([(pos[j], CallResult(fi, inputs[j], Outcome.timeout, detail)) for j in range(got, n)])
                return []
            batch.set(pos[k], CallResult(fi, inputs[k], Outcome.timeout, f"exceeded {sb.timeout_s:g}s"))
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
                batch.set_many([(pos[j], CallResult(fi, inputs[j], Outcome.killed, detail)) for j in range(got, n)])
                return []
            batch.set(pos[k], CallResult(fi, inputs[k], Outcome.killed, detail))
        rest = [j for j in range(got, n) if j != k]
        return [job.sub([fl], rest)] if rest else []


def _children(pid: int) -> list[int]:
    out: list[int] = []
    # the process (or one of its threads) exits meanwhile, or the kernel has no .../children
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as fh:
                out += [int(c) for c in fh.read().split()]
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
    if m.get("bad"):
        return "protocol violation: a function announced another function's start"
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
        max_job_calls: int = 65536,
        max_job_bytes: int = 64 * 1024 * 1024,
        max_file_bytes: int = 1024 * 1024,
        max_open_files: int = 64,
        max_processes: int | None = None,
        tmp_bytes: int = 16 * 1024 * 1024,
        uid: int = 65534,
        gid: int = 65534,
        flush_interval_s: float = 0.05,
        max_functions_per_child: int = 64,
        _extra_pure_modules: Sequence[str] = (),
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
        # >1: a child may go on with the next function of its job after one that provably cannot
        # leave state behind (static purity check + dynamic check, see _purity.py); 1: always fork
        self.max_functions_per_child = max(1, int(max_functions_per_child))
        self._extra_pure_modules = tuple(_extra_pure_modules)  # tests: exercise the dynamic check
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

    def __del__(self, _finalizing=sys.is_finalizing):  # pragma: no cover - best effort
        if "_lock" not in vars(self):  # __init__ failed before the pool existed: nothing to close
            return
        try:
            self.close()
        except Exception:
            # at interpreter shutdown, modules may already be torn down; the workers die with this
            # process anyway (PDEATHSIG / --die-with-parent). Otherwise the failure is reported by
            # sys.unraisablehook rather than hidden.
            if not _finalizing():
                raise

    @property
    def worker_pids(self) -> list[int]:
        """Host pids of the worker processes (bwrap or zygote), for monitoring and tests."""
        return [w.proc.pid for w in self._workers if w.proc is not None]

    @property
    def child_stats(self) -> dict[str, int]:
        """How many functions started in a fresh child and how many in a reused one."""
        out = {"fresh": 0, "reused": 0}
        for w in self._workers:
            for k, v in w.stats.items():
                out[k] += v
        return out

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
        local: list[_Job] = []  # retries stay on this slot, first
        stopping = False
        while True:
            try:
                # keep one job running and one queued in the worker (hides the round trip)
                while not stopping and len(w.inflight) < 2 and not any(len(b) > 4096 for b in w.wbuf):
                    if local:
                        job = local.pop(0)
                    else:
                        try:
                            job = self._queue.get(block=not w.inflight)
                        except queue.Empty:
                            break
                        if job is None:
                            stopping = True
                            break
                    job = self._settle_dead(job)
                    if job is not None:
                        w.submit(job)
                if not w.inflight:
                    if stopping:
                        return
                    continue
                local[:0] = w.service()
            except BaseException as exc:  # noqa: BLE001 - surfaced to the callers of run()
                log.exception("sandbox worker %d failed", w.slot)
                runs, w.inflight = w.inflight, []
                w.kill()
                for run in runs:
                    run.job.batch.fail(exc)
                for job in local:
                    job.batch.fail(exc)
                local = []

    @staticmethod
    def _settle_dead(job: _Job) -> _Job | None:
        """Drop (and settle) the functions of a job that are already known to be dead."""
        batch = job.batch
        if batch.error is not None or batch.done.is_set():
            return None
        if not batch.func_dead:
            return job
        keep = []
        for f, (fi, _src) in enumerate(job.funcs):
            dead = batch.func_dead.get(fi)
            if dead is None:
                keep.append(f)
            else:
                batch.set_many([(p, CallResult(fi, ii, dead[0], dead[1])) for p, ii in zip(job.positions[f], job.inputs)])
        if not keep:
            return None
        return job if len(keep) == len(job.funcs) else job.sub(keep)

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
        pairs_l: list[tuple[int, int]] | None = None
        if pairs is None:
            n = len(funcs) * len(inputs)
        else:
            pairs_l = [(int(i), int(j)) for i, j in pairs]
            for i, j in pairs_l:
                if not (0 <= i < len(funcs)) or not (0 <= j < len(inputs)):
                    raise IndexError(f"pair ({i}, {j}) out of range ({len(funcs)} funcs, {len(inputs)} inputs)")
            n = len(pairs_l)
        if n == 0:
            return []
        if self.isolation is Isolation.none:
            if pairs_l is None:
                pairs_l = [(i, j) for i in range(len(funcs)) for j in range(len(inputs))]
            return self._run_inprocess(funcs, inputs, pairs_l)
        batch = _Batch(n, len(funcs))
        for job in self._plan(batch, funcs, inputs, pairs_l):
            self._queue.put(job)
        while not batch.done.wait(0.5):
            if self._closed:
                batch.fail(SandboxError("sandbox closed during run"))
        if batch.error is not None:
            raise SandboxError(f"sandbox run failed: {batch.error}") from batch.error
        return batch.results  # type: ignore[return-value]

    def _plan(self, batch: _Batch, funcs: list, inputs: list[str], pairs_l: list[tuple[int, int]] | None) -> list[_Job]:
        """Cut the calls into jobs: each function's inputs in chunks, then the functions that have
        exactly the same chunk of inputs grouped, several per job (one message and one decode of
        the inputs per job). ``pairs_l=None`` is the full matrix."""
        m = len(inputs)
        by_func: list[tuple[int, Sequence[int], list[int]]] = []  # (func, positions, input indices)
        if pairs_l is None:
            every = list(range(m))
            by_func = [(i, range(i * m, (i + 1) * m), every) for i in range(len(funcs))]
            used: Sequence[int] = every
            n = len(funcs) * m
        else:
            tmp: dict[int, tuple[list[int], list[int]]] = {}
            for pos, (i, j) in enumerate(pairs_l):
                e = tmp.get(i)
                if e is None:
                    e = tmp[i] = ([], [])
                e[0].append(pos)
                e[1].append(j)
            by_func = [(i, p, ins) for i, (p, ins) in tmp.items()]
            used = sorted({j for _, j in pairs_l})
            n = len(pairs_l)
        enc: list[bytes] = [b""] * m
        for j in used:
            enc[j] = json.dumps(inputs[j]).encode()
        src_enc = {i: len(json.dumps(funcs[i])) if isinstance(funcs[i], str) else 4 for i, _, _ in by_func}
        limit = self.max_job_bytes - 64
        if max(src_enc.values()) + max(len(enc[j]) for j in used) > limit:
            raise ValueError(f"a function plus one input exceeds max_job_bytes={self.max_job_bytes}")
        per_job = self.max_job_calls  # input chunk per function
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
        jobs: list[_Job] = []
        remaining = n
        smallest = max(32, math.ceil(n / (8 * self.workers)))
        for key, members in sorted(groups.items(), key=lambda kv: -len(kv[0]) * len(kv[1])):
            ins = list(key)
            in_bytes = sum(len(enc[j]) + 1 for j in ins)
            cur: list[tuple[int, Sequence[int]]] = []
            size = in_bytes
            cap = 1
            for fi, pos in members:
                if not cur:
                    want = min(self.max_job_calls, max(smallest, math.ceil(remaining / (2 * self.workers))))
                    cap = max(1, want // len(ins))
                elif len(cur) >= cap or size + src_enc[fi] + 1 > limit:
                    jobs.append(self._job(batch, funcs, cur, ins, enc))
                    remaining -= len(cur) * len(ins)
                    cur, size = [], in_bytes
                    want = min(self.max_job_calls, max(smallest, math.ceil(remaining / (2 * self.workers))))
                    cap = max(1, want // len(ins))
                cur.append((fi, pos))
                size += src_enc[fi] + 1
            if cur:
                jobs.append(self._job(batch, funcs, cur, ins, enc))
                remaining -= len(cur) * len(ins)
        jobs.sort(key=lambda jb: -jb.n_calls)  # big first: better tail balance
        return jobs

    @staticmethod
    def _job(batch: _Batch, funcs: list, members: list[tuple[int, Sequence[int]]], ins: list[int],
             enc: list[bytes]) -> _Job:
        return _Job(batch, [(fi, funcs[fi] if isinstance(funcs[fi], str) else None) for fi, _ in members],
                    [pos for _, pos in members], ins, enc)

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
