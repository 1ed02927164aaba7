"""Parent side of the pool: the worker processes of a :class:`~autoif.sandbox.Sandbox`, the
threads that feed them jobs, the watchdog, and turning what workers report into results.

Each worker is one process (a zygote, inside bubblewrap when available; ``_worker.py`` is what
runs in it) with its pipes and progress page, fed by its own long-lived thread from the pool's
queue. What goes over the pipes: ``protocol.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import mmap
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from .execution import short
from .isolation import PACKAGE_DIR, Isolation, warn_once
from .planner import Job
from .protocol import (
    FRAME,
    FRAME_JOB,
    FRAME_KILL,
    PHASE_SETUP,
    PROGRESS,
    PROGRESS_CALL,
    PROGRESS_JOB,
    VALID_CODES,
    WorkerConfig,
)
from .results import OUTCOME_OF_CODE, CallResult, Outcome, SandboxError

log = logging.getLogger("autoif.sandbox")

WORKER_SCRIPT = PACKAGE_DIR / "_worker.py"  # run as a script: see the top of _worker.py


@dataclass(frozen=True)
class PoolConfig:
    """What the parent side of a pool needs; ``worker`` goes to every worker as it is (with its
    progress page's fd and the parent's pid filled in at each start)."""

    size: int  # number of workers
    worker: WorkerConfig
    launcher: tuple[str, ...]  # the bubblewrap command line up to and including "--"; empty: none
    isolation: Isolation  # for messages
    startup_timeout_s: float
    kill_grace_s: float
    max_timeouts_per_func: int | None


# ------------------------------------------------------------------------------------ results of a run
class Batch:
    """The results of one run, filled in by the pool's threads as jobs end."""

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


# ------------------------------------------------------------------------------------ the pool
class Pool:
    """The workers of one sandbox and their threads; jobs go through one shared queue."""

    def __init__(self, cfg: PoolConfig):
        self.cfg = cfg
        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self.workers = [Worker(cfg, i) for i in range(cfg.size)]

    def start(self) -> None:
        """Start every worker; raises the first start failure once all have tried."""
        # Each worker is started (and restarted) by its own long-lived thread: bubblewrap's
        # --die-with-parent and PR_SET_PDEATHSIG fire when the *thread* that forked them exits.
        ready = [threading.Event() for _ in self.workers]
        errors: list[BaseException] = []
        for w, ev in zip(self.workers, ready):
            t = threading.Thread(target=self._loop, args=(w, ev, errors), name=f"autoif-sandbox-{w.slot}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        for ev in ready:
            ev.wait()
        if errors:
            raise errors[0]

    def submit(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self._queue.put(job)

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=30)
        for w in self.workers:
            w.close()

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None]

    @property
    def child_stats(self) -> dict[str, int]:
        out = {"fresh": 0, "reused": 0}
        for w in self.workers:
            for k, v in w.stats.items():
                out[k] += v
        return out

    @property
    def worker_info(self) -> list[dict]:
        return [dict(w.info) for w in self.workers]

    def _loop(self, w: Worker, ready: threading.Event, errors: list) -> None:
        try:
            w.start()
        except BaseException as exc:  # noqa: BLE001 - re-raised by start()
            errors.append(exc)
            return
        finally:
            ready.set()
        local: list[Job] = []  # retries stay on this slot, first
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
    def _settle_dead(job: Job) -> Job | None:
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
                batch.set_many([(p, CallResult(fi, ii, dead[0], dead[1]))
                                for p, ii in zip(job.positions[f], job.inputs)])
        if not keep:
            return None
        return job if len(keep) == len(job.funcs) else job.sub(keep)


# ------------------------------------------------------------------------------------ one worker
class _WorkerDied(Exception):
    pass


@dataclass(eq=False)
class _Run:
    """One attempt of a job on a worker. The job runner starts one child per function, in order;
    `cur` is the function whose child runs now (known from the trusted job runner's messages)."""

    jid: int
    job: Job
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
    violation: str | None = None  # what the function `violation_fn` broke in the protocol
    violation_fn: int | None = None  # local index of the function that broke it (the one running then)


class Worker:
    """One pooled worker process (a zygote, inside bubblewrap when available), its pipes and its
    progress page, seen from the parent: starts it, sends it jobs (at most one ahead of the one
    running), watches the running job (the watchdog kills a call that makes no progress for
    ``timeout_s``) and settles what it reports into the job's batch (the wire: ``protocol.py``).
    """

    def __init__(self, cfg: PoolConfig, slot: int):
        self.cfg = cfg
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
        cfg = self.cfg
        pfd = os.memfd_create("autoif-sandbox-progress", os.MFD_CLOEXEC)
        os.ftruncate(pfd, mmap.PAGESIZE)
        os.set_inheritable(pfd, True)
        # one typed value, as JSON on the command line (never pickle); parsed by the worker
        wcfg = dataclasses.replace(cfg.worker, progress_fd=pfd, parent_pid=os.getpid())
        argv = [*cfg.launcher, sys.executable, "-I", "-B", str(WORKER_SCRIPT), wcfg.to_json()]
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
        deadline = time.monotonic() + cfg.startup_timeout_s
        try:
            while True:
                for m in self._pump(min(0.2, max(0.0, deadline - time.monotonic()))):
                    if isinstance(m, dict) and m.get("t") == "ready":
                        self.info = m
                        if m.get("import_failures"):
                            warn_once("imports:" + ",".join(m["import_failures"]),
                                      "autoif.sandbox: allowed modules that failed to import in the worker: "
                                      + "; ".join(m["import_failures"]))
                        return
                    if isinstance(m, dict) and m.get("t") == "fatal":
                        raise SandboxError(f"sandbox worker failed to start: {m.get('error')}")
                if time.monotonic() > deadline:
                    raise _WorkerDied("no ready message")
        except _WorkerDied as exc:
            self._drain_stderr()
            err = self.stderr_tail.decode(errors="replace")[-2000:]
            self.kill()
            raise SandboxError(f"sandbox worker did not start (isolation={cfg.isolation.value}): {exc}: {err}") from exc
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
        limit = self.cfg.worker.max_output_chars + 64
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
    def submit(self, job: Job) -> None:
        if self.proc is None:
            self.start()
        enc = job.enc_inputs
        body = b"".join(
            [b'{"funcs":[', b",".join(json.dumps(src).encode() for _, src in job.funcs), b'],"inputs":[',
             b",".join([enc[ii] for ii in job.inputs]), b"]}"]
        )
        jid = self.next_jid
        self.next_jid += 1
        self.wbuf.append(memoryview(FRAME.pack(FRAME_JOB, jid, len(body)) + body))
        self.inflight.append(_Run(jid, job, time.monotonic()))

    def _send_kill(self, run: _Run, now: float) -> None:
        self.wbuf.append(memoryview(FRAME.pack(FRAME_KILL, run.jid, 0)))
        run.kill_sent_at = now

    def _page(self) -> tuple[int, int] | None:
        if self.progress is None:
            return None
        page = self.progress
        return PROGRESS.unpack_from(page, PROGRESS_JOB)[0], PROGRESS.unpack_from(page, PROGRESS_CALL)[0]

    def service(self) -> list[Job]:
        """One round of I/O and watchdog. Returns jobs still to run after kills/deaths."""
        cfg = self.cfg
        retry: list[Job] = []
        poll = min(0.05, cfg.worker.timeout_s / 5)
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
                    head.deadline = now + cfg.worker.timeout_s * (head.job.n_calls + 2 * len(head.job.funcs)) + 5.0
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
                        if now - head.last_change > cfg.worker.timeout_s or now > head.deadline:
                            head.timed_out_at = k if jid == head.jid else PHASE_SETUP
                            head.kill_fn = head.cur
                            self._send_kill(head, now)
                    elif now - head.last_change > cfg.startup_timeout_s + cfg.worker.timeout_s or now > head.deadline:
                        self._send_kill(head, now)  # the job runner itself is stuck (should not happen)
                elif head.kill_sent_at is not None and now - head.kill_sent_at > cfg.kill_grace_s:
                    raise _WorkerDied("worker did not stop its job after a kill request")
                elif not head.started and now - head.sent_at > cfg.startup_timeout_s + cfg.worker.timeout_s:
                    raise _WorkerDied("worker did not start the job")
        except _WorkerDied as exc:
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
        if run.violation is not None and run.violation_fn == run.cur:
            return  # the rest of what the offending function sends is ignored; it is charged in _finish_fn
        cfg = self.cfg
        try:
            if len(payload) > cfg.worker.max_output_chars:
                raise ValueError(f"result message over {cfg.worker.max_output_chars} bytes")
            m = json.loads(payload)
            if not isinstance(m, dict):
                raise ValueError("not an object")
            if "c" in m:
                if run.got or run.compile_err is not None:
                    raise ValueError("unexpected compile message")
                run.compile_err = short(str(m["c"]), cfg.worker.detail_chars)
                return
            s, codes, det = m["s"], m["o"], m.get("d") or {}
            if type(s) is not int or s != run.got or type(codes) is not str or not isinstance(det, dict):
                raise ValueError("out-of-order results")
            if run.compile_err is not None:
                raise ValueError("results after a compile error")
            job = run.job
            if s + len(codes) > len(job.inputs):
                raise ValueError("too many results")
            if not VALID_CODES.issuperset(codes):
                raise ValueError(f"bad outcome code in {codes[:20]!r}")
            dets: dict[int, str] = {}
            for key, d in det.items():
                k = int(key)
                if not 0 <= k < len(codes):
                    raise ValueError("detail for a call outside the message")
                dets[k] = short(str(d), cfg.worker.detail_chars)
            self._settle_codes(run, s, codes, dets)
            run.got = s + len(codes)
        except (ValueError, KeyError, TypeError) as exc:
            # charged to the function running now only: by the time the kill lands, the job runner
            # may have started the next function, which is then cut off (and retried), not charged
            run.violation, run.violation_fn = short(str(exc), 200), run.cur
            if run.kill_sent_at is None:
                run.kill_fn = run.cur
                self._send_kill(run, now)

    @staticmethod
    def _settle_codes(run: _Run, s: int, codes: str, dets: dict[int, str]) -> None:
        """Record results s.. of the current function (the hot path: one CallResult per call)."""
        job = run.job
        batch = job.batch
        fi = job.funcs[run.cur][0]
        pos, inp, out = job.positions[run.cur], job.inputs, OUTCOME_OF_CODE
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

    def _finish_run(self, run: _Run, m: dict, page_ok: bool = True) -> list[Job]:
        """Settle a run whose job runner ended; return the jobs that still need a run."""
        retry: list[Job] = []
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
            detail = "job runner failed: " + _exit_detail(m, self.cfg.worker.max_output_chars)
            job.batch.set_many([(p, CallResult(fi, ii, Outcome.killed, short(detail)))
                                for p, ii in zip(job.positions[rest[0]], job.inputs)])
            rest = rest[1:]
        if rest:
            retry.append(job.sub(rest))
        return retry

    def _finish_fn(self, run: _Run, m: dict, page_ok: bool = False) -> list[Job]:
        """Settle the current function of a run after its child ended; return what must run again."""
        cfg = self.cfg
        job, fl = run.job, run.cur
        fi = job.funcs[fl][0]
        pos, inputs, batch = job.positions[fl], job.inputs, job.batch
        n, got = len(inputs), run.got
        if run.violation is not None and run.violation_fn == fl:
            detail = short(f"protocol violation: {run.violation}")
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
                detail = f"module code or setup exceeded {cfg.worker.timeout_s:g}s"
                batch.func_dead[fi] = (Outcome.timeout, detail)
                batch.set_many([(pos[j], CallResult(fi, inputs[j], Outcome.timeout, detail)) for j in range(got, n)])
                return []
            batch.set(pos[k], CallResult(fi, inputs[k], Outcome.timeout, f"exceeded {cfg.worker.timeout_s:g}s"))
            with batch.lock:
                batch.func_timeouts[fi] += 1
                n_to = batch.func_timeouts[fi]
            if cfg.max_timeouts_per_func is not None and n_to >= cfg.max_timeouts_per_func:
                batch.func_dead[fi] = (
                    Outcome.timeout, f"not run: the function already timed out {n_to} times in this batch")
        else:
            detail = _exit_detail(m, cfg.worker.max_output_chars)
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


def _exit_detail(m: dict | None, max_output: int = 0) -> str:
    if not m:
        return "worker process died"
    if m.get("worker"):
        return short("worker process died: " + m["worker"])
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
