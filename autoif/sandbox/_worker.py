"""Worker side of :mod:`autoif.sandbox`: a zygote that forks a job runner per job, which forks
the children that run the functions.

This file runs *inside* the sandbox as a script (``python -I -B _worker.py CONFIG_JSON``, CONFIG_JSON
a :class:`protocol.WorkerConfig`). It and everything it loads (``protocol.py``, ``execution.py``,
``seccomp.py``, ``_purity.py``) only import the standard library at module level (``pyseccomp`` is
only imported in a short-lived helper process). The wire to the parent: ``protocol.py``.

Life of a worker
----------------
1. Start (trusted code only): pre-import the allow-listed modules, build the guarded builtins and
   the purity policy, get the seccomp filter as BPF from a throwaway helper process (pyseccomp
   never enters the zygote, whose size every fork pays for), set rlimits, drop to the
   unprivileged uid/gid, ``gc.freeze()``, then write ``{"t": "ready", ...}`` on stdout.
2. Zygote loop: read a job frame from fd 0 (``>cII`` type/job id/length + JSON
   ``{"funcs": [...], "inputs": [...]}``: several functions, each paired with every input of the
   job; the parent keeps at most one job queued ahead), fork a *job runner*, zero the zygote's
   copy of the frame, forward the job runner's lines and report ``start``/``exit`` status lines
   on stdout. A ``K`` frame for the running job makes the zygote SIGKILL the job runner (its
   current child dies with it, PR_SET_PDEATHSIG, and is reaped by the zygote as subreaper): that
   is how the parent-side watchdog enforces per-call timeouts without restarting the worker.
3. Job runner (trusted): decodes the job once, checks which functions are statically pure
   (``_purity.py``) and forks children in turn; relays each child's result lines (``r <json>``)
   framed by ``fs``/``fe`` (function start/end) lines. Each child has its own result pipe.
4. Child (the only place untrusted code runs): sets ``PR_SET_PDEATHSIG`` and ``RLIMIT_CPU``,
   installs the seccomp filter, then for each function of its run: compiles it once, calls it on
   each input and streams results; before each call it stores the call's index in a shared
   memory page the parent watches. It goes on with the next function only if the function it
   just ran is statically pure (decided by the job runner before the fork) and its own dynamic
   check finds builtins, modules, random/decimal state etc. unchanged; otherwise it ends with
   ``_exit`` and the next function starts in a fresh child forked from the pristine state. So
   nothing a non-pure function changed (builtins, modules, classes, caches, threads, signal
   handlers) survives into the next function, and a function can only report its own results.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time

if not __package__:
    # Run as a script (PEP 366): ``-I`` keeps this directory and the checkout off sys.path, and in
    # bubblewrap only this directory is bound. Import its modules as a package of their own name,
    # so that autoif/__init__.py and the parent side (autoif/sandbox/__init__.py: core, pool,
    # threads) never load into the zygote, whose size every fork copies.
    import types

    _pkg = types.ModuleType("_autoif_sandbox")
    _pkg.__path__ = [os.path.dirname(os.path.abspath(__file__))]
    sys.modules[_pkg.__name__] = _pkg
    __package__ = _pkg.__name__

from . import execution, seccomp  # noqa: E402
from .protocol import (  # noqa: E402
    FRAME_KILL,
    PHASE_SETUP,
    PROGRESS,
    PROGRESS_CALL,
    PROGRESS_JOB,
    WorkerConfig,
    read_exact,
    read_frame,
    write_all,
)

# bound at import time: a function that monkeypatches os/json for its own use must not break
# how its child reports results (deliberate tampering only ever hurts the tamperer's own job)
_exit = os._exit
_os_write = os.write

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36


def _libc():
    import ctypes

    return ctypes.CDLL("libc.so.6", use_errno=True)


def _kill_descendants() -> None:
    """Kill and reap everything left under the zygote (only possible without seccomp)."""
    for _ in range(1000):
        pids = set()
        # a thread that exits meanwhile (or a kernel without .../children) leaves no entry to read
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for tid in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{tid}/children") as fh:
                    pids.update(int(p) for p in fh.read().split())
        for p in pids:
            with contextlib.suppress(ProcessLookupError):  # exited since the listing
                os.kill(p, 9)
        reaped = False
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reaped = True
        if not pids and not reaped:
            return
        time.sleep(0.001)


def _fork_retry() -> int:
    for _attempt in range(200):  # RLIMIT_NPROC is shared by every process of the uid: wait a bit
        try:
            return os.fork()
        except BlockingIOError:
            time.sleep(0.01)
    return os.fork()


class _Zygote:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg

    def send(self, obj: dict) -> None:
        write_all(1, (json.dumps(obj) + "\n").encode())

    def run(self) -> None:  # noqa: C901 - one loop, kept in one place on purpose
        import collections
        import gc
        import mmap
        import resource
        import select
        import signal

        cfg = self.cfg
        detail_chars = cfg.detail_chars
        max_line = cfg.max_output_chars
        info: dict = {"t": "ready", "pid": os.getpid()}
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        libc = _libc()
        libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # process mode: die with the parent's thread
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        if cfg.parent_pid and os.getppid() != cfg.parent_pid and not cfg.in_bwrap:
            os._exit(3)

        # 1. modules the functions may import: imported now, while the files are readable
        allowed = frozenset(cfg.allowed_modules)
        failed = []
        for name in sorted(allowed):
            try:
                __import__(name)
            except Exception as exc:  # e.g. an optional third-party module that is not installed
                failed.append(f"{name}: {execution.describe_exception(exc, 120)}")
        info["import_failures"] = failed
        safe_builtins = execution.make_builtins(allowed)
        purity = None
        if cfg.max_functions_per_child > 1:
            from . import _purity as _pm

            purity = (_pm.Policy(allowed, cfg.extra_pure_modules), _pm)

        # 2. seccomp: compile the filter to BPF once; each child installs it with one prctl
        fprog = None
        if cfg.seccomp:
            try:
                # built in a throwaway process: pyseccomp and libseccomp stay out of the zygote, whose
                # size is what every fork copies and every child's exit tears down
                fprog = seccomp.load(libc)
            except Exception as exc:  # reported to the parent, which refuses to start this worker
                self.send({"t": "fatal", "error": "seccomp unavailable: " + execution.describe_exception(exc, 300)})
                os._exit(4)

        # 3. rlimits (inherited by children; hard limits cannot be raised again once root is dropped)
        mem = cfg.memory_mb * 1024 * 1024
        limits = {
            resource.RLIMIT_AS: mem,
            resource.RLIMIT_DATA: mem,
            resource.RLIMIT_FSIZE: cfg.fsize_bytes,
            resource.RLIMIT_NOFILE: cfg.nofile,
            resource.RLIMIT_NPROC: cfg.nproc,
            resource.RLIMIT_CORE: 0,
            resource.RLIMIT_MEMLOCK: 0,
        }
        if hasattr(resource, "RLIMIT_MSGQUEUE"):
            limits[resource.RLIMIT_MSGQUEUE] = 0
        for res, val in limits.items():
            try:
                resource.setrlimit(res, (val, val))
            except (ValueError, OSError) as exc:
                self.send({"t": "fatal", "error": f"setrlimit({res}) failed: {exc}"})
                os._exit(5)

        # 4. drop privileges
        if os.getuid() == 0:
            os.setgroups([])
            os.setgid(cfg.gid)
            os.setuid(cfg.uid)
            if 0 in (os.getuid(), os.geteuid(), os.getgid(), os.getegid()):
                os._exit(6)
        info["uid"] = os.getuid()
        info["seccomp"] = fprog is not None
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # /proc/<zygote>/fd etc. unreachable for children

        progress = mmap.mmap(cfg.progress_fd, mmap.PAGESIZE)
        zygote_pid = os.getpid()
        gc.collect()
        gc.freeze()  # children do not walk (and copy) the zygote's heap pages on collection
        self.send(info)

        pending: collections.deque = collections.deque()  # at most one job read ahead

        def read_job_or_kill():
            fr = read_frame(0)
            if fr is None:
                return None
            typ, jid, n = fr
            if typ == FRAME_KILL:
                return (typ, jid, None)
            if n > cfg.max_job_bytes:
                self.send({"t": "fatal", "error": "job frame too large"})
                os._exit(7)
            data = read_exact(0, n)
            if data is None:
                return None
            return (typ, jid, data)

        while True:
            if not pending:
                fr = read_job_or_kill()
                if fr is None:
                    os._exit(0)
                if fr[0] == FRAME_KILL:
                    continue  # a kill for a job that already ended
                pending.append(fr)
            _typ, jid, frame = pending.popleft()
            PROGRESS.pack_into(progress, PROGRESS_JOB, jid)
            PROGRESS.pack_into(progress, PROGRESS_CALL, PHASE_SETUP)
            r, w = os.pipe()
            pid = _fork_retry()
            if pid == 0:
                try:
                    os.close(r)
                    os.dup2(w, 1)
                    os.close(w)
                    _job_runner(frame, cfg, fprog, safe_builtins, progress, libc, zygote_pid, detail_chars, max_line,
                                purity)
                finally:
                    _exit(70)
            os.close(w)
            _zero(frame)
            del frame
            self.send({"t": "start", "j": jid})
            pidfd = os.pidfd_open(pid)
            os.set_blocking(r, False)
            poller = select.poll()
            poller.register(0, select.POLLIN)
            poller.register(pidfd, select.POLLIN)
            poller.register(r, select.POLLIN)
            buf = bytearray()
            overflow = killed = False
            r_open = True

            def relay() -> None:
                # the job runner is trusted code: its lines are forwarded as they are (whole lines only)
                nonlocal buf, overflow, r_open
                while r_open:
                    try:
                        chunk = os.read(r, 1 << 20)
                    except BlockingIOError:
                        break
                    if not chunk:
                        r_open = False
                        poller.unregister(r)
                        break
                    buf += chunk
                    cut = buf.rfind(b"\n")
                    if cut >= 0:
                        write_all(1, buf[: cut + 1])
                        del buf[: cut + 1]
                    if len(buf) > max_line + 256:
                        overflow = True
                        buf = bytearray()
                        with contextlib.suppress(ProcessLookupError):  # the job runner already exited
                            os.kill(pid, 9)

            while True:
                for fd, _ev in poller.poll():
                    if fd == r:
                        relay()
                    elif fd == 0:
                        fr = read_job_or_kill()
                        if fr is None:  # the parent closed the pipe: stop, reaping the job first
                            os.kill(pid, 9)
                            os.waitpid(pid, 0)
                            _kill_descendants()
                            os._exit(0)
                        if fr[0] == FRAME_KILL:
                            if fr[1] == jid:
                                os.kill(pid, 9)  # the job runner's current child dies with it (PDEATHSIG)
                                killed = True
                        elif pending:
                            os.kill(pid, 9)
                            self.send({"t": "fatal", "error": "protocol error: more than one job ahead"})
                            os._exit(8)
                        else:
                            pending.append(fr)
                try:
                    wpid, st = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    wpid, st = pid, 0
                if wpid == pid:
                    break
            os.close(pidfd)
            # a killed job runner leaves its current child orphaned (we are its subreaper): make sure
            # it is dead and reaped before the next job, so it cannot touch the progress page again
            _kill_descendants()
            relay()  # everything the job runner wrote is in the pipe now
            if r_open:
                poller.unregister(r)
            os.close(r)
            msg = {"t": "exit", "j": jid, "code": None, "sig": None, "overflow": overflow,
                   "killed_by_parent": killed}
            if os.WIFSIGNALED(st):
                msg["sig"] = os.WTERMSIG(st)
            elif os.WIFEXITED(st):
                msg["code"] = os.WEXITSTATUS(st)
            self.send(msg)


def _zero(buf: bytearray) -> None:
    import ctypes

    n = len(buf)
    if n:
        ctypes.memset((ctypes.c_char * n).from_buffer(buf), 0, n)


def zygote(cfg: WorkerConfig) -> None:
    _Zygote(cfg).run()


def _job_runner(frame, cfg, fprog, safe_builtins, progress, libc, zygote_pid, detail_chars, max_line, purity):
    """One job = several functions x the same inputs (every function of a job is paired with every
    input of it). Trusted code: decodes the job once, then forks children that run its functions
    in order. Every child starts from the zygote's pristine state and gets its own result pipe,
    created after the previous child is gone.

    A child runs several functions in a row only while the functions before the last one pass the
    static purity check (``_purity.Policy.is_pure``, done here, before the fork) and the child's
    own check that nothing changed (``_purity.unchanged``); the first function that does not pass
    runs last in its child and the next function gets a fresh fork. Pure code cannot write to any
    file descriptor, so all it can send is its own results; the one function of a child that may
    not be pure is its last one, and a "next function" marker from it is a protocol violation.

    Writes to fd 1 (a pipe to the zygote): ``{"t":"fs","i":I,"new":B}`` when function I starts
    (B: in a fresh child), ``r <line>`` for each result line, ``{"t":"fe","i":I,...}`` after it ended.
    """
    import gc

    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    if os.getppid() != zygote_pid:
        _exit(71)
    os.close(0)
    job = json.loads(frame)
    _zero(frame)
    del frame
    srcs, inputs = job["funcs"], job["inputs"]
    del job
    if type(srcs) is not list or type(inputs) is not list or any(type(x) is not str for x in inputs):  # noqa: E721
        _exit(73)
    nf = len(srcs)
    max_run = cfg.max_functions_per_child
    policy = purity[0] if purity is not None and max_run > 1 else None
    pure = [policy.is_pure(s) for s in srcs[:-1]] + [False] if policy is not None and nf > 1 else [False] * nf
    gc.freeze()  # the decoded job is shared, untouched by the children's collections
    me = os.getpid()
    pack_into, unpack_from = PROGRESS.pack_into, PROGRESS.unpack_from

    def fe(i: int, st: int | None, bad: bool = False, overflow: bool = False) -> bytes:
        code = b"0" if st is None else (b"%d" % os.WEXITSTATUS(st) if os.WIFEXITED(st) else b"null")
        sig = b"%d" % os.WTERMSIG(st) if st is not None and os.WIFSIGNALED(st) else b"null"
        return b'{"t":"fe","i":%d,"k":%d,"code":%s,"sig":%s,"overflow":%s,"bad":%s}\n' % (
            i, unpack_from(progress, PROGRESS_CALL)[0], code, sig, b"true" if overflow else b"false",
            b"true" if bad else b"false")

    i = 0
    while i < nf:
        last = i  # this child may run functions i..last: pure ones, then one that may not be
        while last < nf - 1 and pure[last] and last - i + 1 < max_run:
            last += 1
        pack_into(progress, PROGRESS_CALL, PHASE_SETUP)
        write_all(1, b'{"t":"fs","i":%d,"new":true}\n' % i)
        r, w = os.pipe()
        pid = _fork_retry()
        if pid == 0:
            try:
                os.close(r)
                os.dup2(w, 1)
                os.close(w)
                _child(srcs[i:last + 1], inputs, cfg, fprog, safe_builtins, progress, libc, me, detail_chars,
                       purity)
            finally:
                _exit(70)
        os.close(w)
        cur = i
        buf = bytearray()
        overflow = bad = False
        while True:
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break  # the child is the only writer: EOF means it exited (or closed its stdout)
            if overflow or bad:
                continue
            buf += chunk
            if b"\n" in chunk:
                *lines, rest = buf.split(b"\n")
                buf = bytearray(rest)
                out = []
                for ln in lines:
                    if ln == b"N":  # the child finished function `cur` and goes on with the next
                        if cur >= last:
                            bad = True
                            break
                        if out:
                            write_all(1, b"".join(out))
                            out = []
                        write_all(1, fe(cur, None) + b'{"t":"fs","i":%d,"new":false}\n' % (cur + 1))
                        cur += 1
                    elif ln:
                        out.append(b"r " + ln + b"\n")
                if out:
                    write_all(1, b"".join(out))
            if bad or len(buf) > max_line:
                overflow = not bad
                buf = bytearray()
                with contextlib.suppress(ProcessLookupError):  # the child already exited
                    os.kill(pid, 9)
        os.close(r)
        _, st = os.waitpid(pid, 0)
        write_all(1, fe(cur, st, bad, overflow))
        i = cur + 1
    _exit(0)


def _child(srcs, inputs, cfg, fprog, safe_builtins, progress, libc, parent_pid, detail_chars, purity):
    import gc
    import resource

    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(71)
    n = len(inputs)
    cpu = int(cfg.timeout_s * (n + 1) * len(srcs)) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    if fprog is not None and not seccomp.install(fprog, libc):
        os._exit(72)  # never run untrusted code without the filter that was asked for
    sys.stdout = sys.stderr = execution.Sink()
    sys.stdin = None
    write, exit_ = _os_write, _exit

    def emit(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[write(1, view):]

    snap = template = None
    if len(srcs) > 1:
        snap = purity[1].snapshot(cfg.allowed_modules)
        template = dict(safe_builtins)
        peak_limit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + 64 * 1024  # kB
    for idx, src in enumerate(srcs):
        if idx:
            # the previous function was statically pure; make sure anyway that it changed nothing
            # (and that it did not leave a fragmented heap: after a big allocation, start afresh)
            gc.collect()
            if not (purity[1].unchanged(snap) and safe_builtins == template
                    and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < peak_limit):
                exit_(0)  # the job runner starts the next function in a fresh child
            PROGRESS.pack_into(progress, PROGRESS_CALL, PHASE_SETUP)
            emit(b"N\n")
        execution.run_function(src, list(inputs), cfg.flush_interval_s, cfg.max_output_chars, safe_builtins,
                               progress, detail_chars, emit)
        src = None
    exit_(0)


def main() -> None:
    zygote(WorkerConfig.from_json(sys.argv[1]))


if __name__ == "__main__":
    main()
