"""Worker side of :mod:`autoif.sandbox`: a zygote process that forks one child per job.

This file runs *inside* the sandbox as a script (``python -I -B _worker.py CONFIG_JSON``) and is
also imported by the parent for the ``isolation=none`` path (:func:`make_namespace`,
:func:`normalise`, :func:`run_calls`). It must only import the standard library at module level
(``pyseccomp`` is imported lazily, inside the sandbox).

Life of a worker
----------------
1. Start (trusted code only): pre-import the allow-listed modules, build the guarded builtins,
   prepare the seccomp filter, set rlimits, drop to the unprivileged uid/gid, ``gc.freeze()``,
   then report ``{"t": "ready", ...}`` on the status fd.
2. Loop: read one job frame from fd 0 (4-byte big-endian length + JSON
   ``{"src": ..., "inputs": [...]}``), ``fork()`` a child, zero the zygote's copy of the frame
   and wait for the child (a length-0 frame from the parent while a child runs means "SIGKILL
   it": that is how the parent-side watchdog enforces per-call timeouts without restarting the
   whole worker). Report ``{"t": "exit", "code": ..., "sig": ...}`` on the status fd.
3. The child (the only place untrusted code runs): close fd 0 and the status fd, set
   ``PR_SET_PDEATHSIG``, ``RLIMIT_CPU``, load the seccomp filter, compile the function once,
   call it on each input of the job, and stream results as JSON lines on fd 1. Before each call
   it stores the call's index in a shared memory page the parent watches (the watchdog).
   The child always ends with ``os._exit``: nothing a function changed (builtins, modules,
   threads, signal handlers) survives into the next job.
"""
from __future__ import annotations

import builtins
import json
import os
import struct
import sys
import time

# outcome codes on the wire (single letters keep result lines small)
PASS, FAIL, ERROR, INVALID, COMPILE = "p", "f", "e", "i", "c"

_FORBIDDEN_BUILTINS = ("open", "input", "breakpoint", "help", "exit", "quit", "copyright", "credits", "license")
_PROGRESS = struct.Struct("<q")
PHASE_SETUP = -1  # progress value while the child compiles the function / runs its module code


# --------------------------------------------------------------------------------------- shared helpers
def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def normalise(value, detail_chars: int = 200):
    """Map a return value to (code, detail). Only exact bool, int 0/1 and str "true"/"false" count.

    Uses ``type(...) is`` checks so no user-defined ``__eq__``/``__bool__``/``__str__`` runs here.
    """
    t = type(value)
    if t is bool:
        return (PASS, "") if value else (FAIL, "")
    if t is int:
        if value == 1:
            return PASS, ""
        if value == 0:
            return FAIL, ""
        return INVALID, _short(f"returned int {value if abs(value) < 10**12 else '(large)'}", detail_chars)
    if t is str:
        s = value.strip().lower()
        if s == "true":
            return PASS, ""
        if s == "false":
            return FAIL, ""
        return INVALID, _short(f"returned str {value[:40]!r}", detail_chars)
    if value is None:
        return INVALID, "returned None"
    name = getattr(t, "__name__", "?")
    if type(name) is not str:  # noqa: E721 - a hostile metaclass could make __name__ anything
        name = "?"
    return INVALID, _short(f"returned {name[:60]}", detail_chars)


def describe_exception(exc: BaseException, detail_chars: int = 200) -> str:
    name = type(exc).__name__
    try:
        msg = str(exc)
    except BaseException:  # a hostile __str__; the call is still under the watchdog
        msg = "<unprintable>"
    if type(msg) is not str:  # noqa: E721
        msg = "<unprintable>"
    return _short(f"{name}: {msg}" if msg else name, detail_chars)


def make_import(allowed: frozenset[str], real_import=builtins.__import__):
    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level != 0:
            raise ImportError("relative imports are not allowed in verification functions")
        if type(name) is not str or name.partition(".")[0] not in allowed:  # noqa: E721
            raise ImportError(f"import of {name!r} is not allowed (allowed: {', '.join(sorted(allowed))})")
        return real_import(name, globals, locals, fromlist, level)

    return guarded_import


def make_builtins(allowed: frozenset[str]) -> dict:
    b = dict(builtins.__dict__)
    for k in _FORBIDDEN_BUILTINS:
        b.pop(k, None)
    b["__import__"] = make_import(allowed)
    return b


def make_namespace(safe_builtins: dict) -> dict:
    # a fresh copy per function: patching builtins only changes this function's view
    return {"__builtins__": dict(safe_builtins), "__name__": "verifier"}


def compile_function(src: str, safe_builtins: dict, detail_chars: int = 200):
    """Compile + exec the source once; return (evaluate, None) or (None, detail)."""
    if type(src) is not str:  # noqa: E721
        return None, "source is not a string"
    try:
        code = compile(src, "<verifier>", "exec")
    except BaseException as exc:  # SyntaxError, ValueError (null bytes), RecursionError, MemoryError
        return None, describe_exception(exc, detail_chars)
    ns = make_namespace(safe_builtins)
    try:
        exec(code, ns)
    except BaseException as exc:
        return None, "module code raised " + describe_exception(exc, detail_chars)
    fn = ns.get("evaluate")
    if not callable(fn):
        return None, "no callable `evaluate` defined"
    return fn, None


def run_calls(fn, inputs, detail_chars: int = 200, progress=None):
    """In-process loop used by isolation=none (the child has its own streaming loop)."""
    out = []
    for k, inp in enumerate(inputs):
        if progress is not None:
            progress(k)
        try:
            out.append(normalise(fn(inp), detail_chars))
        except BaseException as exc:
            out.append((ERROR, describe_exception(exc, detail_chars)))
    return out


class _Sink:
    """Replaces sys.stdout/sys.stderr in the child: prints are discarded, never reach the pipe."""

    encoding = "utf-8"

    def write(self, s):
        return len(s) if isinstance(s, str) else 0

    def flush(self):
        return None

    def isatty(self):
        return False


# --------------------------------------------------------------------------------------- seccomp
# Denied with EPERM (errno 1), so Python raises PermissionError and the call ends as `error`.
_DENY = (
    # network
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4", "sendto", "sendmsg",
    "sendmmsg", "recvfrom", "recvmsg", "recvmmsg", "getsockopt", "setsockopt", "shutdown",
    # processes, threads, exec
    "execve", "execveat", "fork", "vfork", "clone", "kill", "tkill", "tgkill", "rt_sigqueueinfo",
    "rt_tgsigqueueinfo", "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "setsid", "setpgid",
    # introspection of other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    # namespaces, mounts, privileges
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr",
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "setfsuid",
    "setfsgid", "capset", "personality",
    # kernel attack surface
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key", "init_module",
    "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff",
    "acct", "quotactl", "syslog", "iopl", "ioperm", "lookup_dcookie", "open_by_handle_at",
    "name_to_handle_at", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "fanotify_init", "inotify_init",
    "inotify_init1", "mknod", "mknodat",
    # file system changes (the root is read-only in bwrap mode; this also covers the process mode)
    "creat", "unlink", "unlinkat", "rename", "renameat", "renameat2", "mkdir", "mkdirat", "rmdir",
    "link", "linkat", "symlink", "symlinkat", "chmod", "fchmod", "fchmodat", "chown", "fchown",
    "fchownat", "lchown", "truncate", "utime", "utimes", "utimensat", "futimesat", "setxattr",
    "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
)
_ENOSYS = ("clone3", "openat2")  # glibc falls back to clone/openat, which the rules above/below handle


def build_seccomp_filter():
    """A pyseccomp filter (default allow, hostile syscalls denied). Raises if unavailable."""
    import ctypes.util

    orig = ctypes.util.find_library
    # pyseccomp calls find_library at import, which execs ldconfig: avoid that (and its cost)
    known = {"seccomp": "libseccomp.so.2", "c": "libc.so.6"}

    def find_library(name):
        cand = known.get(name)
        if cand:
            try:
                ctypes.CDLL(cand)
                return cand
            except OSError:
                pass
        return orig(name)

    ctypes.util.find_library = find_library
    try:
        import pyseccomp as sc
    finally:
        ctypes.util.find_library = orig

    f = sc.SyscallFilter(sc.ALLOW)
    eperm, enosys = sc.ERRNO(1), sc.ERRNO(38)
    for name in _DENY:
        try:
            f.add_rule(eperm, name)
        except Exception:  # syscall unknown on this architecture
            pass
    for name in _ENOSYS:
        try:
            f.add_rule(enosys, name)
        except Exception:
            pass
    # no file opened for writing: deny open/openat whose flags ask for write access or creation
    wr = {"O_WRONLY": os.O_WRONLY, "O_RDWR": os.O_RDWR, "O_CREAT": os.O_CREAT, "O_TRUNC": os.O_TRUNC}
    for call, argpos in (("open", 1), ("openat", 2)):
        for bit in wr.values():
            try:
                f.add_rule(eperm, call, sc.Arg(argpos, sc.MASKED_EQ, bit, bit))
            except Exception:
                pass
    # ioctl TIOCSTI (terminal injection)
    try:
        f.add_rule(eperm, "ioctl", sc.Arg(1, sc.EQ, 0x5412))
    except Exception:
        pass
    return f


# --------------------------------------------------------------------------------------- zygote
def _libc():
    import ctypes

    return ctypes.CDLL("libc.so.6", use_errno=True)


PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36


def _read_exact(fd: int, n: int) -> bytearray | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            return None
        got += k
    return buf


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        k = os.write(fd, view)
        view = view[k:]


def _kill_descendants(libc_prctl_ok: bool) -> None:
    """Kill and reap everything left under the zygote (only possible without seccomp)."""
    for _ in range(1000):
        pids = set()
        try:
            for tid in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{tid}/children") as fh:
                    pids.update(int(p) for p in fh.read().split())
        except OSError:
            pass
        for p in pids:
            try:
                os.kill(p, 9)
            except OSError:
                pass
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
    for attempt in range(200):  # RLIMIT_NPROC is shared by every process of the uid: wait a bit
        try:
            return os.fork()
        except BlockingIOError:
            time.sleep(0.01)
    return os.fork()


def zygote(cfg: dict) -> None:
    import gc
    import mmap
    import resource
    import select
    import signal

    status_fd = cfg["status_fd"]
    progress_fd = cfg["progress_fd"]
    detail_chars = int(cfg["detail_chars"])
    timeout_s = float(cfg["timeout_s"])
    info: dict = {"t": "ready", "pid": os.getpid()}

    def status(msg: dict) -> None:
        _write_all(status_fd, (json.dumps(msg) + "\n").encode())

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    libc = _libc()
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # process mode: die with the parent
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    if cfg.get("parent_pid") and os.getppid() != cfg["parent_pid"] and not cfg.get("in_bwrap"):
        os._exit(3)

    # 1. modules the functions may import: imported now, while the files are still readable
    allowed = frozenset(cfg["allowed_modules"])
    failed = []
    for name in sorted(allowed):
        try:
            __import__(name)
        except Exception as exc:  # e.g. an optional third-party module that is not installed
            failed.append(f"{name}: {describe_exception(exc, 120)}")
    info["import_failures"] = failed
    safe_builtins = make_builtins(allowed)

    # 2. seccomp filter (loaded in each child after fork)
    sfilter = None
    if cfg["seccomp"]:
        try:
            sfilter = build_seccomp_filter()
        except Exception as exc:
            status({"t": "fatal", "error": "seccomp unavailable: " + describe_exception(exc, 300)})
            os._exit(4)

    # 3. rlimits (inherited by children; hard limits cannot be raised again once we drop root)
    mem = int(cfg["memory_mb"]) * 1024 * 1024
    limits = {
        resource.RLIMIT_AS: mem,
        resource.RLIMIT_DATA: mem,
        resource.RLIMIT_FSIZE: int(cfg["fsize_bytes"]),
        resource.RLIMIT_NOFILE: int(cfg["nofile"]),
        resource.RLIMIT_NPROC: int(cfg["nproc"]),
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_MEMLOCK: 0,
    }
    if hasattr(resource, "RLIMIT_MSGQUEUE"):
        limits[resource.RLIMIT_MSGQUEUE] = 0
    for res, val in limits.items():
        try:
            resource.setrlimit(res, (val, val))
        except (ValueError, OSError) as exc:
            status({"t": "fatal", "error": f"setrlimit({res}) failed: {exc}"})
            os._exit(5)

    # 4. drop privileges
    uid, gid = cfg.get("uid"), cfg.get("gid")
    if os.getuid() == 0 and uid is not None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        if os.getuid() == 0 or os.geteuid() == 0:
            os._exit(6)
    info["uid"] = os.getuid()
    info["seccomp"] = sfilter is not None
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # /proc/<zygote>/fd etc. not reachable by children

    progress = mmap.mmap(progress_fd, mmap.PAGESIZE)
    zygote_pid = os.getpid()
    gc.collect()
    gc.freeze()  # children do not touch (and copy) the zygote's heap pages during collection
    status(info)

    poller = select.poll()
    poller.register(0, select.POLLIN)
    while True:
        head = _read_exact(0, 4)
        if head is None:
            os._exit(0)
        (n,) = struct.unpack(">I", head)
        if n == 0:  # a kill request that arrived after the child had already gone
            continue
        if n > cfg["max_job_bytes"]:
            status({"t": "fatal", "error": "job frame too large"})
            os._exit(7)
        frame = _read_exact(0, n)
        if frame is None:
            os._exit(0)
        pid = _fork_retry()
        if pid == 0:
            try:
                _child(frame, cfg, sfilter, safe_builtins, progress, libc, zygote_pid, detail_chars, timeout_s)
            finally:
                os._exit(70)
        frame[:] = bytes(len(frame))  # nothing of this job stays readable in the zygote
        del frame
        pidfd = os.pidfd_open(pid)
        poller.register(pidfd, select.POLLIN)
        killed_by_parent = False
        while True:
            for fd, _ev in poller.poll():
                if fd == 0 and not killed_by_parent:
                    req = _read_exact(0, 4)
                    if req is None:
                        os.kill(pid, 9)
                        os._exit(0)
                    if struct.unpack(">I", req)[0] != 0:
                        os.kill(pid, 9)
                        status({"t": "fatal", "error": "protocol error: job while busy"})
                        os._exit(8)
                    os.kill(pid, 9)
                    killed_by_parent = True
                    poller.unregister(0)
            try:
                wpid, st = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                wpid, st = pid, 0
            if wpid == pid:
                break
        poller.unregister(pidfd)
        os.close(pidfd)
        if killed_by_parent:
            poller.register(0, select.POLLIN)
        _kill_descendants(True)
        msg = {"t": "exit", "code": None, "sig": None}
        if os.WIFSIGNALED(st):
            msg["sig"] = os.WTERMSIG(st)
        elif os.WIFEXITED(st):
            msg["code"] = os.WEXITSTATUS(st)
        status(msg)


def _child(frame, cfg, sfilter, safe_builtins, progress, libc, zygote_pid, detail_chars, timeout_s):
    import resource

    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    if os.getppid() != zygote_pid:
        os._exit(71)
    os.close(0)
    os.close(cfg["status_fd"])
    job = json.loads(frame)
    frame[:] = bytes(len(frame))
    del frame
    src, inputs = job["src"], job["inputs"]
    n = len(inputs)
    cpu = int(timeout_s * (n + 1)) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    if sfilter is not None:
        sfilter.load()
    sys.stdout = sys.stderr = _Sink()
    sys.stdin = None
    set_progress = _PROGRESS.pack_into
    out_fd = 1

    def emit(obj) -> None:
        _write_all(out_fd, (json.dumps(obj, separators=(",", ":")) + "\n").encode())

    set_progress(progress, 0, PHASE_SETUP)
    fn, err = compile_function(src, safe_builtins, detail_chars)
    del src, job
    if fn is None:
        emit({"c": err})
        os._exit(0)

    codes: list[str] = []
    details: dict[str, str] = {}
    start = 0
    now = time.perf_counter
    last_flush = now()
    flush_every = float(cfg["flush_interval_s"])
    # keep every result line well under the parent's per-message cap
    max_pending = max(1, int(cfg["max_output_chars"]) // 4)
    pending = 0
    for k in range(n):
        inp = inputs[k]
        inputs[k] = None  # the list only ever holds inputs not yet evaluated
        set_progress(progress, 0, k)
        try:
            v = fn(inp)
        except BaseException as exc:  # noqa: BLE001 - every exception is an `error` outcome
            codes.append(ERROR)
            d = describe_exception(exc, detail_chars)
            details[str(k)] = d
            pending += len(d) + 16
        else:
            t = type(v)
            if t is bool:
                codes.append(PASS if v else FAIL)
            else:
                c, d = normalise(v, detail_chars)
                codes.append(c)
                if d:
                    details[str(k)] = d
                    pending += len(d) + 16
        del inp
        pending += 1
        if pending > max_pending or now() - last_flush > flush_every:
            emit({"s": start, "o": "".join(codes), "d": details})
            start += len(codes)
            codes, details = [], {}
            pending = 0
            last_flush = now()
    set_progress(progress, 0, n)
    emit({"s": start, "o": "".join(codes), "d": details, "end": n})
    os._exit(0)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    zygote(cfg)


if __name__ == "__main__":
    main()
