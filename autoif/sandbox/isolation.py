"""Which isolation layers this machine allows, and the bubblewrap command line that confines a worker.

Modes, strongest first (what each layer does: see ``core.py``): ``bwrap_seccomp``, ``bwrap``,
``seccomp``, ``process``, ``none``. ``auto`` picks the strongest available and warns, once per
process, when that is weaker than ``bwrap_seccomp``.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import sysconfig
import threading
import warnings
from enum import Enum
from pathlib import Path

from .results import SandboxError

log = logging.getLogger("autoif.sandbox")

PACKAGE_DIR = Path(__file__).resolve().parent  # holds the worker script and what it loads


class Isolation(str, Enum):
    auto = "auto"
    bwrap_seccomp = "bwrap_seccomp"
    bwrap = "bwrap"
    seccomp = "seccomp"
    process = "process"
    none = "none"


# ------------------------------------------------------------------------------------ environment probes
_probe_lock = threading.Lock()
_probe_cache: dict[str, object] = {}
_warned: set[str] = set()


def which_bwrap() -> str | None:
    return shutil.which("bwrap")


def pyseccomp_available() -> bool:
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


def warn_once(key: str, message: str) -> None:
    with _probe_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_isolation(requested: Isolation) -> Isolation:
    bwrap_ok = which_bwrap() is not None
    sc_ok = pyseccomp_available()
    if requested is Isolation.auto:
        if bwrap_ok and sc_ok:
            return Isolation.bwrap_seccomp
        missing = [n for n, ok in (("bubblewrap (Debian package `bubblewrap`)", bwrap_ok),
                                   ("seccomp (PyPI `pyseccomp` + libseccomp2)", sc_ok)) if not ok]
        mode = Isolation.bwrap if bwrap_ok else (Isolation.seccomp if sc_ok else Isolation.process)
        warn_once(
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
        warn_once("none", "autoif.sandbox: isolation=none runs generated code IN-PROCESS with no "
                          "protection and no timeouts; use it only for trusted code.")
    return requested


# ------------------------------------------------------------------------------------ bubblewrap
def bind_roots() -> list[str]:
    """Read-only paths a worker needs: the interpreter, the venv, site-packages, this package."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            paths.add(p)
    paths.add(str(Path(sys.executable).resolve().parent.parent))
    paths.add(str(PACKAGE_DIR))
    out = []
    for p in sorted({os.path.realpath(p) for p in paths} | paths, key=len):
        if not os.path.isdir(p) or p in ("/", "/usr") or p.startswith("/usr/"):
            continue
        if any(p == q or p.startswith(q + "/") for q in out):
            continue
        out.append(p)
    return out


def bwrap_argv(bwrap: str, tmp_bytes: int) -> list[str]:
    """bubblewrap up to (not including) ``--``: new pid, net, ipc, uts and cgroup namespaces; a
    read-only root that only holds /usr, the Python installation, the virtualenv and this package;
    a private size-limited /tmp; its own /proc; a minimal /dev."""
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
    roots = bind_roots()
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
