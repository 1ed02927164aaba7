"""Worker side of :mod:`autoif.sandbox`: a zygote that forks a job runner per job, which forks
the children that run the functions.

This file runs *inside* the sandbox as a script (``python -I -B _worker.py CONFIG_JSON``) and is
also imported by the parent for the ``isolation=none`` path (:func:`make_namespace`,
:func:`normalise`, :func:`run_calls`). It must only import the standard library at module level
(``pyseccomp`` is only imported in a short-lived helper process, ``_purity.py`` is loaded by path).

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

import builtins
import contextlib
import json
import os
import struct
import sys
import time

# outcome codes on the wire (single letters keep result lines small)
PASS, FAIL, ERROR, INVALID, COMPILE = "p", "f", "e", "i", "c"

_FORBIDDEN_BUILTINS = ("open", "input", "breakpoint", "help", "exit", "quit", "copyright", "credits", "license")
_PROGRESS = struct.Struct("<q")
# bound at import time: a function that monkeypatches os/json for its own use must not break
# how its child reports results (deliberate tampering only ever hurts the tamperer's own job)
_exit = os._exit
_os_write = os.write
_JSON_ESC = {i: f"\\u{i:04x}" for i in range(32)}
_JSON_ESC[ord('"')] = '\\"'
_JSON_ESC[ord("\\")] = "\\\\"


def _jstr(s: str) -> str:
    """JSON string literal using only built-in str operations (no json module)."""
    return '"' + s.translate(_JSON_ESC) + '"'


def _result_line(start: int, codes: str, details: dict, end: int | None = None) -> bytes:
    d = ",".join(f'"{k}":{_jstr(v)}' for k, v in details.items())
    tail = f',"end":{end:d}' if end is not None else ""
    return f'{{"s":{start:d},"o":"{codes}","d":{{{d}}}{tail}}}\n'.encode("utf-8", "replace")
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
        s = value.strip().lower() if len(value) <= 32 else ""
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
_NR_SCMP_ERROR = -1  # libseccomp's resolve_name result for a syscall name unknown on the architecture


def build_seccomp_filter():
    """A pyseccomp filter (default allow, hostile syscalls denied). Raises if unavailable."""
    import ctypes.util

    orig = ctypes.util.find_library
    # pyseccomp calls find_library at import, which execs ldconfig: avoid that (and its cost)
    known = {"seccomp": "libseccomp.so.2", "c": "libc.so.6"}

    def find_library(name):
        cand = known.get(name)
        if cand:
            with contextlib.suppress(OSError):  # not loadable under that soname: let ctypes search
                ctypes.CDLL(cand)
                return cand
        return orig(name)

    ctypes.util.find_library = find_library
    try:
        import pyseccomp as sc
    finally:
        ctypes.util.find_library = orig

    f = sc.SyscallFilter(sc.ALLOW)

    def add_rule(action, name, *args):
        # libseccomp resolves a name it does not know for this architecture (e.g. ``open`` on
        # aarch64) to __NR_SCMP_ERROR (-1), which add_rule would reject with EINVAL: there is
        # nothing to deny then. Any other failure is a broken filter and propagates.
        nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
        if nr != _NR_SCMP_ERROR:
            f.add_rule(action, nr, *args)

    eperm, enosys = sc.ERRNO(1), sc.ERRNO(38)
    for name in _DENY:
        add_rule(eperm, name)
    for name in _ENOSYS:
        add_rule(enosys, name)
    # no file opened for writing: deny open/openat whose flags ask for write access or creation
    wr = {"O_WRONLY": os.O_WRONLY, "O_RDWR": os.O_RDWR, "O_CREAT": os.O_CREAT, "O_TRUNC": os.O_TRUNC}
    for call, argpos in (("open", 1), ("openat", 2)):
        for bit in wr.values():
            add_rule(eperm, call, sc.Arg(argpos, sc.MASKED_EQ, bit, bit))
    # ioctl TIOCSTI (terminal injection)
    add_rule(eperm, "ioctl", sc.Arg(1, sc.EQ, 0x5412))
    return f


def _compile_bpf_elsewhere() -> tuple[int, bytes]:
    """(seccomp syscall number or -1, BPF program) computed by a short-lived child process."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            sfilter = build_seccomp_filter()
            efd = os.memfd_create("bpf")
            with os.fdopen(efd, "w+b") as fh:
                sfilter.export_bpf(fh)
                fh.seek(0)
                bpf = fh.read()
            try:
                import pyseccomp as _sc

                nr = int(_sc.resolve_syscall(_sc.system_arch(), "seccomp"))
            except Exception:
                nr = -1
            _write_all(w, struct.pack("<q", nr) + bpf)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        c = os.read(r, 1 << 16)
        if not c:
            break
        chunks.append(c)
    os.close(r)
    _, st = os.waitpid(pid, 0)
    data = b"".join(chunks)
    if st != 0 or len(data) < 8:
        raise RuntimeError("building the seccomp filter failed (pyseccomp/libseccomp missing or broken?)")
    return struct.unpack("<q", data[:8])[0], data[8:]


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


FRAME = struct.Struct(">cII")  # type (b"J" job, b"K" kill), job id, payload length
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


def _read_frame(fd: int):
    head = _read_exact(fd, FRAME.size)
    if head is None:
        return None
    typ, jid, n = FRAME.unpack(head)
    if typ not in (b"J", b"K"):
        raise ValueError("bad frame type")
    return typ, jid, n


class _Zygote:
    def __init__(self, cfg: dict):
        self.cfg = cfg

    def send(self, obj: dict) -> None:
        _write_all(1, (json.dumps(obj) + "\n").encode())

    def run(self) -> None:  # noqa: C901 - one loop, kept in one place on purpose
        import collections
        import ctypes
        import gc
        import mmap
        import resource
        import select
        import signal

        cfg = self.cfg
        detail_chars = int(cfg["detail_chars"])
        max_line = int(cfg["max_output_chars"])
        info: dict = {"t": "ready", "pid": os.getpid()}
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        libc = _libc()
        libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # process mode: die with the parent's thread
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        if cfg.get("parent_pid") and os.getppid() != cfg["parent_pid"] and not cfg.get("in_bwrap"):
            os._exit(3)

        # 1. modules the functions may import: imported now, while the files are readable
        allowed = frozenset(cfg["allowed_modules"])
        failed = []
        for name in sorted(allowed):
            try:
                __import__(name)
            except Exception as exc:  # e.g. an optional third-party module that is not installed
                failed.append(f"{name}: {describe_exception(exc, 120)}")
        info["import_failures"] = failed
        safe_builtins = make_builtins(allowed)
        purity = None
        if int(cfg.get("max_functions_per_child", 1)) > 1:
            _pm = _load_purity()
            purity = (_pm.Policy(allowed, cfg.get("extra_pure_modules", ())), _pm)

        # 2. seccomp: compile the filter to BPF once; each child installs it with one prctl
        fprog = None
        if cfg["seccomp"]:
            try:
                # built in a throwaway process: pyseccomp and libseccomp stay out of the zygote, whose
                # size is what every fork copies and every child's exit tears down
                fprog_nr, bpf = _compile_bpf_elsewhere()
                if not bpf or len(bpf) % 8:
                    raise ValueError("empty or malformed BPF program")

                class _SockFprog(ctypes.Structure):
                    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

                bpf_buf = ctypes.create_string_buffer(bpf, len(bpf))
                fprog = _SockFprog(len(bpf) // 8, ctypes.addressof(bpf_buf))
                fprog._keep = bpf_buf
                fprog._nr = fprog_nr
                if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
            except Exception as exc:
                self.send({"t": "fatal", "error": "seccomp unavailable: " + describe_exception(exc, 300)})
                os._exit(4)

        # 3. rlimits (inherited by children; hard limits cannot be raised again once root is dropped)
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
                self.send({"t": "fatal", "error": f"setrlimit({res}) failed: {exc}"})
                os._exit(5)

        # 4. drop privileges
        uid, gid = cfg.get("uid"), cfg.get("gid")
        if os.getuid() == 0 and uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            if 0 in (os.getuid(), os.geteuid(), os.getgid(), os.getegid()):
                os._exit(6)
        info["uid"] = os.getuid()
        info["seccomp"] = fprog is not None
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # /proc/<zygote>/fd etc. unreachable for children

        progress = mmap.mmap(cfg["progress_fd"], mmap.PAGESIZE)
        zygote_pid = os.getpid()
        gc.collect()
        gc.freeze()  # children do not walk (and copy) the zygote's heap pages on collection
        self.send(info)

        pending: collections.deque = collections.deque()  # at most one job read ahead

        def read_job_or_kill():
            fr = _read_frame(0)
            if fr is None:
                return None
            typ, jid, n = fr
            if typ == b"K":
                return (typ, jid, None)
            if n > cfg["max_job_bytes"]:
                self.send({"t": "fatal", "error": "job frame too large"})
                os._exit(7)
            data = _read_exact(0, n)
            if data is None:
                return None
            return (typ, jid, data)

        while True:
            if not pending:
                fr = read_job_or_kill()
                if fr is None:
                    os._exit(0)
                if fr[0] == b"K":
                    continue  # a kill for a job that already ended
                pending.append(fr)
            _typ, jid, frame = pending.popleft()
            _PROGRESS.pack_into(progress, 0, jid)
            _PROGRESS.pack_into(progress, 8, PHASE_SETUP)
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
                        _write_all(1, buf[: cut + 1])
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
                        if fr[0] == b"K":
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


def zygote(cfg: dict) -> None:
    _Zygote(cfg).run()


def _load_purity():
    try:
        from . import _purity  # imported as part of the package
    except ImportError:  # run as a script (the worker): load the sibling file by path
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "autoif_sandbox_purity", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_purity.py"))
        _purity = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_purity)
    return _purity


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
    max_run = int(cfg.get("max_functions_per_child", 1))
    policy = purity[0] if purity is not None and max_run > 1 else None
    pure = [policy.is_pure(s) for s in srcs[:-1]] + [False] if policy is not None and nf > 1 else [False] * nf
    gc.freeze()  # the decoded job is shared, untouched by the children's collections
    me = os.getpid()
    write_all, pack_into, unpack_from = _write_all, _PROGRESS.pack_into, _PROGRESS.unpack_from

    def fe(i: int, st: int | None, bad: bool = False, overflow: bool = False) -> bytes:
        code = b"0" if st is None else (b"%d" % os.WEXITSTATUS(st) if os.WIFEXITED(st) else b"null")
        sig = b"%d" % os.WTERMSIG(st) if st is not None and os.WIFSIGNALED(st) else b"null"
        return b'{"t":"fe","i":%d,"k":%d,"code":%s,"sig":%s,"overflow":%s,"bad":%s}\n' % (
            i, unpack_from(progress, 8)[0], code, sig, b"true" if overflow else b"false", b"true" if bad else b"false")

    i = 0
    while i < nf:
        last = i  # this child may run functions i..last: pure ones, then one that may not be
        while last < nf - 1 and pure[last] and last - i + 1 < max_run:
            last += 1
        pack_into(progress, 8, PHASE_SETUP)
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
    import ctypes
    import gc
    import resource

    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(71)
    n = len(inputs)
    cpu = int(float(cfg["timeout_s"]) * (n + 1) * len(srcs)) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    if fprog is not None:
        # SECCOMP_FILTER_FLAG_SPEC_ALLOW: without it the kernel also turns on the Speculative Store
        # Bypass mitigation for the task, which slows pure-Python code noticeably; that mitigation
        # guards against reading the task's own memory, which the code can do anyway.
        ok = fprog._nr > 0 and libc.syscall(fprog._nr, 1, 4, ctypes.byref(fprog)) == 0
        if not ok and libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
            os._exit(72)  # never run untrusted code without the filter that was asked for
    sys.stdout = sys.stderr = _Sink()
    sys.stdin = None
    write, exit_ = _os_write, _exit

    def emit(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[write(1, view):]

    snap = template = None
    if len(srcs) > 1:
        snap = purity[1].snapshot(cfg["allowed_modules"])
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
            _PROGRESS.pack_into(progress, 8, PHASE_SETUP)
            emit(b"N\n")
        _run_function(src, list(inputs), cfg, safe_builtins, progress, detail_chars, emit)
        src = None
    exit_(0)


def _run_function(src, inputs, cfg, safe_builtins, progress, detail_chars, emit):
    # the call index lives in the second 8-byte slot of the shared progress page (little-endian)
    slots = memoryview(progress).cast("q") if sys.byteorder == "little" else None
    result_line, jstr = _result_line, _jstr
    fn, err = compile_function(src, safe_builtins, detail_chars)
    del src
    if fn is None:
        emit(('{"c":' + jstr(err) + "}\n").encode("utf-8", "replace"))
        return

    n = len(inputs)
    codes: list[str] = []
    details: dict[str, str] = {}
    start = 0
    now = time.perf_counter
    last_flush = now()
    flush_every = float(cfg["flush_interval_s"])
    # keep every result line well under the parent's per-message cap
    max_pending = max(1, int(cfg["max_output_chars"]) // 4)
    pending = 0
    append = codes.append
    for k in range(n):
        inp = inputs[k]
        inputs[k] = None  # the list only ever holds inputs not yet evaluated
        if slots is not None:
            slots[1] = k
        else:
            _PROGRESS.pack_into(progress, 8, k)
        try:
            v = fn(inp)
        except BaseException as exc:  # noqa: BLE001 - every exception is an `error` outcome
            append(ERROR)
            d = describe_exception(exc, detail_chars)
            details[str(k - start)] = d
            pending += len(d) + 16
        else:
            if type(v) is bool:
                append(PASS if v else FAIL)
            else:
                c, d = normalise(v, detail_chars)
                append(c)
                if d:
                    details[str(k - start)] = d
                    pending += len(d) + 16
        inp = v = None
        pending += 1
        if pending > max_pending or (not k & 15 and now() - last_flush > flush_every):
            emit(result_line(start, "".join(codes), details))
            start += len(codes)
            codes, details = [], {}
            append = codes.append
            pending = 0
            last_flush = now()
    _PROGRESS.pack_into(progress, 8, n)
    emit(result_line(start, "".join(codes), details, n))


def main() -> None:
    cfg = json.loads(sys.argv[1])
    zygote(cfg)


if __name__ == "__main__":
    main()
