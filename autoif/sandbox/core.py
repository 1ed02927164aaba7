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
import errno
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
from typing import Iterable, Sequence

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


class _Worker:
    """One pooled worker process (a zygote, optionally inside bubblewrap) and its pipes."""

    def __init__(self, sb: "Sandbox", slot: int):
        self.sb = sb
        self.slot = slot
        self.proc: subprocess.Popen | None = None
        self.progress: mmap.mmap | None = None
        self.info: dict = {}
        self.stderr_tail = b""

    # -- lifecycle
    def start(self) -> None:
        sb = self.sb
        status_r, status_w = os.pipe()
        pfd = os.memfd_create("autoif-sandbox-progress", os.MFD_CLOEXEC)
        os.ftruncate(pfd, mmap.PAGESIZE)
        os.set_inheritable(pfd, True)
        cfg = {
            "status_fd": status_w,
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
        py = sys.executable
        argv = [py, "-I", "-B", str(WORKER_SCRIPT), json.dumps(cfg)]
        if cfg["in_bwrap"]:
            argv = _bwrap_argv(sb.bwrap_path, sb.tmp_bytes) + ["--"] + argv
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(status_w, pfd), env=env, cwd="/", start_new_session=True, close_fds=True,
            )
        finally:
            os.close(status_w)
        self.progress = mmap.mmap(pfd, mmap.PAGESIZE)
        os.close(pfd)
        self.status_fd = status_r
        self.out_fd = self.proc.stdout.fileno()
        self.err_fd = self.proc.stderr.fileno()
        self.in_fd = self.proc.stdin.fileno()
        for fd in (self.status_fd, self.out_fd, self.err_fd, self.in_fd):
            os.set_blocking(fd, False)
        try:
            fcntl.fcntl(self.in_fd, 1031, 1 << 20)  # F_SETPIPE_SZ: fewer wakeups for big jobs
            fcntl.fcntl(self.out_fd, 1031, 1 << 20)
        except OSError:
            pass
        self.status_buf = bytearray()
        self.out_buf = bytearray()
        deadline = time.monotonic() + sb.startup_timeout_s
        while True:
            msgs = self._pump(deadline - time.monotonic())
            for m in msgs:
                if m.get("t") == "ready":
                    self.info = m
                    if m.get("import_failures"):
                        _warn_once("imports:" + ",".join(m["import_failures"]),
                                   "autoif.sandbox: allowed modules that failed to import in the worker: "
                                   + "; ".join(m["import_failures"]))
                    return
                if m.get("t") == "fatal":
                    self.kill()
                    raise SandboxError(f"sandbox worker failed to start: {m.get('error')}")
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self._drain_stderr()
                err = self.stderr_tail.decode(errors="replace")[-2000:]
                self.kill()
                raise SandboxError(f"sandbox worker did not start (isolation={sb.isolation.value}): {err}")

    def kill(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
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
        try:
            os.close(self.status_fd)
        except OSError:
            pass
        if self.progress is not None:
            self.progress.close()
            self.progress = None

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
        while True:
            try:
                chunk = os.read(self.err_fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                return
            if not chunk:
                return
            self.stderr_tail = (self.stderr_tail + chunk)[-4096:]

    def _read_lines(self, fd: int, buf: bytearray, limit: int) -> tuple[list[bytes], bool]:
        """Read what is available; return complete lines and whether EOF was seen."""
        eof = False
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                eof = True
                break
            buf += chunk
            if len(buf) > 2 * limit + (1 << 20):
                raise _ProtocolViolation(f"worker output exceeds {limit} bytes per message")
        if b"\n" not in buf:
            if len(buf) > limit:
                raise _ProtocolViolation(f"worker output exceeds {limit} bytes per message")
            return [], eof
        *lines, rest = bytes(buf).split(b"\n")
        buf[:] = rest
        if len(rest) > limit or any(len(x) > limit for x in lines):
            raise _ProtocolViolation(f"worker output exceeds {limit} bytes per message")
        return lines, eof

    def _pump(self, wait_s: float, want_write: bool = False) -> list[dict]:
        """Wait up to wait_s for status messages; result lines are kept in self.pending_out."""
        fds_r = [self.status_fd, self.err_fd, self.out_fd]
        fds_w = [self.in_fd] if want_write else []
        try:
            r, w, _ = select.select(fds_r, fds_w, [], max(0.0, wait_s))
        except (OSError, ValueError) as exc:
            raise _WorkerDied(f"select failed: {exc}") from exc
        self.writable = bool(w)
        msgs = []
        if self.err_fd in r:
            self._drain_stderr()
        if self.status_fd in r:
            lines, eof = self._read_lines(self.status_fd, self.status_buf, 1 << 16)
            for line in lines:
                try:
                    m = json.loads(line)
                except ValueError as exc:
                    raise _WorkerDied(f"bad status line from worker: {line[:100]!r}") from exc
                if not isinstance(m, dict):
                    raise _WorkerDied("bad status message from worker")
                msgs.append(m)
            if eof and not msgs:
                raise _WorkerDied("worker exited")
        self.out_ready = self.out_fd in r
        return msgs

    # -- one job (with retries for the calls after a killed/timed-out one)
    def run_job(self, job: _Job) -> None:
        sb = self.sb
        batch = job.batch
        todo = list(job.calls)
        fi = job.func_index
        while todo:
            dead = batch.func_dead.get(fi)
            if dead is not None:
                for pos, ii in todo:
                    batch.set(pos, CallResult(fi, ii, dead[0], dead[1]))
                return
            if self.proc is None:
                self.start()
            todo = self._attempt(job, todo)

    def _attempt(self, job: _Job, todo: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Run `todo` once. Returns the calls still to run (after a kill), [] when all are settled."""
        sb = self.sb
        batch = job.batch
        fi = job.func_index
        frame_body = b"".join(
            [b'{"src":', json.dumps(job.src).encode(), b',"inputs":[',
             b",".join(job.enc_inputs[ii] for _, ii in todo), b"]}"]
        )
        if len(frame_body) > sb.max_job_bytes:  # split (cannot happen for a single call: checked in run)
            half = max(1, len(todo) // 2)
            rest = self._attempt(job, todo[:half])
            return rest + todo[half:]
        data = memoryview(struct.pack(">I", len(frame_body)) + frame_body)
        _PROGRESS_SET(self.progress, 0, -2)
        got: list[tuple[str, str]] = []  # (code, detail) in order
        compile_err: str | None = None
        last_prog, last_change = -2, time.monotonic()
        job_deadline = last_change + sb.timeout_s * (len(todo) + 2) + 5.0
        exit_msg: dict | None = None
        kill_sent_at: float | None = None
        timed_out_at: int | None = None
        poll = min(0.05, sb.timeout_s / 5)
        violation: str | None = None

        def settle_results(lines: list[bytes]) -> None:
            nonlocal compile_err
            for line in lines:
                try:
                    m = json.loads(line)
                    if "c" in m:
                        if got or compile_err is not None:
                            raise ValueError("unexpected compile message")
                        compile_err = str(m["c"])[: sb.max_detail_chars]
                        continue
                    s, codes, det = int(m["s"]), m["o"], m.get("d") or {}
                    if s != len(got) or not isinstance(codes, str) or not isinstance(det, dict):
                        raise ValueError("out-of-order results")
                    if len(got) + len(codes) > len(todo):
                        raise ValueError("too many results")
                    for k, c in enumerate(codes):
                        if c not in _CODE or c == _worker.COMPILE:
                            raise ValueError(f"bad outcome code {c!r}")
                        d = det.get(str(k))
                        got.append((c, str(d)[: sb.max_detail_chars] if d is not None else ""))
                except (ValueError, KeyError, TypeError) as exc:
                    raise _ProtocolViolation(f"bad result line: {exc}") from exc

        try:
            while True:
                now = time.monotonic()
                msgs = self._pump(poll, want_write=bool(data))
                if data and self.writable:
                    try:
                        k = os.write(self.in_fd, data)
                        data = data[k:]
                    except BlockingIOError:
                        pass
                    except BrokenPipeError as exc:
                        raise _WorkerDied("worker closed its input") from exc
                if self.out_ready or msgs:
                    lines, _eof = self._read_lines(self.out_fd, self.out_buf, sb.max_output_chars)
                    settle_results(lines)
                for m in msgs:
                    if m.get("t") == "exit":
                        exit_msg = m
                    elif m.get("t") == "fatal":
                        raise _WorkerDied(f"worker fatal: {m.get('error')}")
                if exit_msg is not None:
                    # the child is gone: everything it wrote is in the pipe now
                    lines, _eof = self._read_lines(self.out_fd, self.out_buf, sb.max_output_chars)
                    settle_results(lines)
                    self.out_buf.clear()
                    break
                prog = _PROGRESS_GET(self.progress, 0)[0]
                if prog != last_prog:
                    last_prog, last_change = prog, now
                if kill_sent_at is None:
                    if now - last_change > sb.timeout_s or now > job_deadline:
                        timed_out_at = prog
                        self._send_kill(data)
                        data = memoryview(b"")
                        kill_sent_at = now
                elif now - kill_sent_at > sb.kill_grace_s:
                    raise _WorkerDied("worker did not stop its child after a timeout")
        except _ProtocolViolation as exc:
            violation = str(exc)
            self.kill()
        except _WorkerDied as exc:
            if self.progress is not None:
                last_prog = _PROGRESS_GET(self.progress, 0)[0]
            self._drain_stderr_safe()
            log.warning("sandbox worker %d died: %s", self.slot, exc)
            self.kill()
            exit_msg = {"t": "exit", "code": None, "sig": None, "worker": str(exc)}

        fi = job.func_index
        if violation is not None:
            for pos, ii in todo[len(got):]:
                job.batch.set(pos, CallResult(fi, ii, Outcome.killed, _short(f"protocol violation: {violation}")))
            for (pos, ii), (c, d) in zip(todo, got):
                job.batch.set(pos, CallResult(fi, ii, _CODE[c], d))
            return []
        if compile_err is not None:
            outcome = Outcome.compile_error
            job.batch.func_dead[fi] = (outcome, compile_err)
            for pos, ii in todo:
                job.batch.set(pos, CallResult(fi, ii, outcome, compile_err))
            return []
        for (pos, ii), (c, d) in zip(todo, got):
            job.batch.set(pos, CallResult(fi, ii, _CODE[c], d))
        rest = todo[len(got):]
        if not rest:
            return []
        # the child ended early: who was running?
        prog = _PROGRESS_GET(self.progress, 0)[0] if self.progress is not None else last_prog
        if timed_out_at is not None:
            prog = timed_out_at
        culprit_k = prog if len(got) <= prog < len(todo) else len(got)
        in_setup = prog < 0
        culprit_pos, culprit_ii = todo[culprit_k]
        if timed_out_at is not None:
            if in_setup:
                detail = f"module code or setup exceeded {sb.timeout_s:g}s"
                job.batch.func_dead[fi] = (Outcome.timeout, detail)
                for pos, ii in todo[len(got):]:
                    job.batch.set(pos, CallResult(fi, ii, Outcome.timeout, detail))
                return []
            detail = f"exceeded {sb.timeout_s:g}s"
            job.batch.set(culprit_pos, CallResult(fi, culprit_ii, Outcome.timeout, detail))
            with job.batch.lock:
                job.batch.func_timeouts[fi] += 1
                n_to = job.batch.func_timeouts[fi]
            if sb.max_timeouts_per_func is not None and n_to >= sb.max_timeouts_per_func:
                job.batch.func_dead[fi] = (
                    Outcome.timeout, f"not run: the function already timed out {n_to} times in this batch")
        else:
            detail = _exit_detail(exit_msg)
            if in_setup:
                job.batch.func_dead[fi] = (Outcome.killed, "while defining evaluate: " + detail)
                for pos, ii in todo[len(got):]:
                    job.batch.set(pos, CallResult(fi, ii, Outcome.killed, "while defining evaluate: " + detail))
                return []
            job.batch.set(culprit_pos, CallResult(fi, culprit_ii, Outcome.killed, detail))
        return [c for i, c in enumerate(todo) if i >= len(got) and i != culprit_k]

    def _send_kill(self, unsent: memoryview) -> None:
        if unsent and len(unsent) > 0:
            # the zygote has not read the whole frame yet: only a restart resynchronises the pipe
            raise _WorkerDied("timeout while the job was still being sent")
        try:
            os.set_blocking(self.in_fd, True)
            os.write(self.in_fd, struct.pack(">I", 0))
            os.set_blocking(self.in_fd, False)
        except OSError as exc:
            raise _WorkerDied(f"could not send kill request: {exc}") from exc

    def _drain_stderr_safe(self) -> None:
        if self.proc is not None:
            try:
                self._drain_stderr()
            except Exception:  # noqa: BLE001 - diagnostics only
                log.debug("could not read worker stderr", exc_info=True)


class _ProtocolViolation(Exception):
    pass


_PROGRESS_SET = struct.Struct("<q").pack_into
_PROGRESS_GET = struct.Struct("<q").unpack_from


def _short(s: str, n: int = 300) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _exit_detail(m: dict | None) -> str:
    if not m:
        return "worker process died"
    if m.get("worker"):
        return _short("worker process died: " + m["worker"])
    if m.get("sig") is not None:
        sig = m["sig"]
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        extra = {
            signal.SIGKILL: " (resource limit or killed)", signal.SIGXCPU: " (CPU time limit)",
            signal.SIGSEGV: " (crashed)", signal.SIGXFSZ: " (file size limit)", signal.SIGSYS: " (forbidden syscall)",
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
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.batch.error is not None or job.batch.done.is_set():
                continue
            try:
                w.run_job(job)
            except BaseException as exc:  # noqa: BLE001 - surfaced to the caller of run()
                log.exception("sandbox worker %d failed", w.slot)
                w.kill()
                job.batch.fail(exc)

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
        chunk = max(1, min(self.max_job_calls, math.ceil(len(pairs_l) / (self.workers * 4))))
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
