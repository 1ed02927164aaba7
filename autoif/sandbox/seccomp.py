"""The seccomp filter of the children that run generated code: the rules, their compilation to
BPF, and loading it.

The zygote gets the BPF program once from a throwaway helper process (:func:`load`), so pyseccomp
and libseccomp never enter the zygote, whose size every fork copies and every child's exit tears
down; each child then installs it with one syscall (:func:`install`) before any untrusted code runs.
Standard library only at module level (``pyseccomp`` is imported in the helper process only).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import struct

from .protocol import write_all

# Denied with EPERM (errno 1), so Python raises PermissionError and the call ends as `error`.
DENY = (
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
ENOSYS = ("clone3", "openat2")  # glibc falls back to clone/openat, which the rules above/below handle
_NR_SCMP_ERROR = -1  # libseccomp's resolve_name result for a syscall name unknown on the architecture

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_SPEC_ALLOW = 1, 4


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
    for name in DENY:
        add_rule(eperm, name)
    for name in ENOSYS:
        add_rule(enosys, name)
    # no file opened for writing: deny open/openat whose flags ask for write access or creation
    wr = {"O_WRONLY": os.O_WRONLY, "O_RDWR": os.O_RDWR, "O_CREAT": os.O_CREAT, "O_TRUNC": os.O_TRUNC}
    for call, argpos in (("open", 1), ("openat", 2)):
        for bit in wr.values():
            add_rule(eperm, call, sc.Arg(argpos, sc.MASKED_EQ, bit, bit))
    # ioctl TIOCSTI (terminal injection)
    add_rule(eperm, "ioctl", sc.Arg(1, sc.EQ, 0x5412))
    return f


def _bpf_program() -> bytes:
    """The `seccomp` syscall number (int64) + the BPF program of :func:`build_seccomp_filter`."""
    sfilter = build_seccomp_filter()
    efd = os.memfd_create("bpf")
    with os.fdopen(efd, "w+b") as fh:
        sfilter.export_bpf(fh)
        fh.seek(0)
        bpf = fh.read()
    import pyseccomp as sc  # already imported (and checked) by build_seccomp_filter

    # __NR_SCMP_ERROR (-1) where libseccomp does not know the syscall: install() then uses prctl
    nr = int(sc.resolve_syscall(sc.system_arch(), "seccomp"))
    return struct.pack("<q", nr) + bpf


def compile_bpf_elsewhere() -> tuple[int, bytes]:
    """(seccomp syscall number or -1, BPF program) computed by a short-lived child process."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            try:
                data = _bpf_program()
                code = 0
            except Exception as exc:  # reported to the zygote through the pipe (exit status 1)
                data = f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")
            write_all(w, data)
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
        why = data.decode("utf-8", "replace")[:300] if st != 0 and data else f"helper exit status {st}"
        raise RuntimeError(f"building the seccomp filter failed (pyseccomp/libseccomp missing or broken?): {why}")
    return struct.unpack("<q", data[:8])[0], data[8:]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load(libc) -> _SockFprog:
    """The filter, ready for :func:`install` (zygote side, trusted). Also sets no_new_privs, which
    loading a filter without CAP_SYS_ADMIN requires. Raises when anything is missing."""
    nr, bpf = compile_bpf_elsewhere()
    if not bpf or len(bpf) % 8:
        raise ValueError("empty or malformed BPF program")
    bpf_buf = ctypes.create_string_buffer(bpf, len(bpf))
    fprog = _SockFprog(len(bpf) // 8, ctypes.addressof(bpf_buf))
    fprog._keep = bpf_buf
    fprog._nr = nr
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
    return fprog


def install(fprog: _SockFprog, libc) -> bool:
    """Load the filter into the calling process (a child, before any untrusted code). False if
    the kernel refused it: the caller must then not run untrusted code."""
    # SECCOMP_FILTER_FLAG_SPEC_ALLOW: without it the kernel also turns on the Speculative Store
    # Bypass mitigation for the task, which slows pure-Python code noticeably; that mitigation
    # guards against reading the task's own memory, which the code can do anyway.
    ok = fprog._nr > 0 and libc.syscall(fprog._nr, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_SPEC_ALLOW,
                                        ctypes.byref(fprog)) == 0
    return ok or libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0
