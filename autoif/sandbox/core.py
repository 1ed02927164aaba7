"""The sandbox's public class, :class:`Sandbox`, and the process-wide pool (:func:`shared_sandbox`).

What runs where: ``planner.py`` cuts a run into jobs, ``pool.py`` (parent side) feeds them to
the workers and watches them, ``_worker.py`` is what runs inside a worker, ``protocol.py`` the
wire between the two, ``isolation.py`` / ``seccomp.py`` the confinement. Security layers,
strongest mode first:

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
import os
import sys
import threading
from typing import Sequence

from . import execution
from .isolation import Isolation, bwrap_argv, resolve_isolation, warn_once, which_bwrap
from .planner import plan
from .pool import Batch, Pool, PoolConfig
from .protocol import WorkerConfig
from .results import OUTCOME_OF_CODE, CallResult, Outcome, SandboxError

__all__ = [
    "DEFAULT_ALLOWED_MODULES", "CallResult", "Isolation", "Outcome", "Sandbox", "SandboxError",
    "close_shared_sandbox", "shared_sandbox",
]

DEFAULT_ALLOWED_MODULES: tuple[str, ...] = (
    "re", "json", "string", "math", "collections", "itertools", "functools", "operator", "unicodedata",
    "textwrap", "difflib", "statistics", "datetime", "calendar", "html", "bisect", "heapq",
    "fractions", "decimal", "typing", "enum", "dataclasses", "copy", "random", "keyword", "numbers",
)


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
        self.isolation = resolve_isolation(Isolation(isolation))
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
        self.bwrap_path = which_bwrap() or "bwrap"
        if os.getuid() != 0 and self.isolation not in (Isolation.none,):
            warn_once("nonroot", "autoif.sandbox: not running as root, so workers cannot switch to an "
                                 "unprivileged uid; they keep the caller's uid (rlimits, bwrap and seccomp still apply).")
        self._closed = False
        self._lock = threading.Lock()
        self._safe_builtins = None
        self._pool: Pool | None = None
        if self.isolation is not Isolation.none:
            self._pool = Pool(self._pool_config())
            try:
                self._pool.start()
            except BaseException:
                self.close()
                raise

    def _pool_config(self) -> PoolConfig:
        in_bwrap = self.isolation in (Isolation.bwrap_seccomp, Isolation.bwrap)
        worker = WorkerConfig(
            progress_fd=-1,  # filled in at each worker start, with parent_pid
            allowed_modules=self.allowed_modules,
            seccomp=self.isolation in (Isolation.bwrap_seccomp, Isolation.seccomp),
            memory_mb=self.memory_mb,
            fsize_bytes=self.max_file_bytes,
            nofile=self.max_open_files,
            nproc=self.max_processes,
            uid=self.uid,
            gid=self.gid,
            detail_chars=self.max_detail_chars,
            timeout_s=self.timeout_s,
            flush_interval_s=self.flush_interval_s,
            max_job_bytes=self.max_job_bytes,
            max_output_chars=self.max_output_chars,
            max_functions_per_child=self.max_functions_per_child,
            extra_pure_modules=self._extra_pure_modules,
            parent_pid=0,
            in_bwrap=in_bwrap,
        )
        return PoolConfig(
            size=self.workers,
            worker=worker,
            launcher=(*bwrap_argv(self.bwrap_path, self.tmp_bytes), "--") if in_bwrap else (),
            isolation=self.isolation,
            startup_timeout_s=self.startup_timeout_s,
            kill_grace_s=self.kill_grace_s,
            max_timeouts_per_func=self.max_timeouts_per_func,
        )

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
        return self._pool.worker_pids if self._pool is not None else []

    @property
    def child_stats(self) -> dict[str, int]:
        """How many functions started in a fresh child and how many in a reused one."""
        return self._pool.child_stats if self._pool is not None else {"fresh": 0, "reused": 0}

    @property
    def worker_info(self) -> list[dict]:
        return self._pool.worker_info if self._pool is not None else []

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._pool is not None:
            self._pool.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- work
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
        batch = Batch(n, len(funcs))
        self._pool.submit(plan(batch, funcs, inputs, pairs_l, workers=self.workers, max_job_calls=self.max_job_calls,
                               max_job_bytes=self.max_job_bytes))
        while not batch.done.wait(0.5):
            if self._closed:
                batch.fail(SandboxError("sandbox closed during run"))
        if batch.error is not None:
            raise SandboxError(f"sandbox run failed: {batch.error}") from batch.error
        return batch.results  # type: ignore[return-value]

    def _run_inprocess(self, funcs: list[str], inputs: list[str], pairs: list[tuple[int, int]]) -> list[CallResult]:
        if self._safe_builtins is None:
            self._safe_builtins = execution.make_builtins(frozenset(self.allowed_modules))
        compiled: dict[int, tuple[object, str | None]] = {}
        out: list[CallResult] = []
        for i, j in pairs:
            if i not in compiled:
                compiled[i] = execution.compile_function(funcs[i], self._safe_builtins, self.max_detail_chars)
            fn, err = compiled[i]
            if fn is None:
                out.append(CallResult(i, j, Outcome.compile_error, err or ""))
                continue
            (code, detail), = execution.run_calls(fn, [inputs[j]], self.max_detail_chars)
            out.append(CallResult(i, j, OUTCOME_OF_CODE[code], detail))
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
