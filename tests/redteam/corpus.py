"""Red-team corpus for autoif.sandbox: hostile or broken verification functions.

Each case has the source of a function, the outcome it must get in the secure mode
(``bwrap_seccomp``) and, where the attack aims at the host, a host-side check that nothing
happened. Attacks reach the real ``os``/``sys``/``__import__`` through Python introspection
(``_real()`` below), i.e. they bypass the import allow-list on purpose: what is tested is the
sandbox underneath (namespaces, seccomp, uid, rlimits, watchdog), not the allow-list.

An attack is written so that *success* returns True (outcome ``pass``); a contained attack
returns False (``fail``) or raises (``error``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

# reaches the real os module and the real __import__ without the (guarded) import statement
PRELUDE = '''
def _os():
    for c in ().__class__.__base__.__subclasses__():
        if c.__name__ == "_wrap_close":
            return c.__init__.__globals__["sys"].modules["os"]
    raise RuntimeError("no os")

def _imp(name):
    return _os().sys.modules["builtins"].__import__(name)
'''


@dataclass
class Ctx:
    """Host-side facts the cases are built from."""

    host_dir: str  # a host directory outside /tmp (not visible in the sandbox)
    host_tmp_file: str  # a path under the host's /tmp that must never appear
    secret_file: str  # a 0600 file holding `secret`
    secret: str
    secret_env: str  # name of an env var of the test process holding `secret`
    host_pid: int  # the test process
    listen_port: int  # a TCP listener on 127.0.0.1 owned by the test
    marker: str  # a string that only appears in the input of the "victim" call


@dataclass
class Case:
    name: str
    src: str
    expect: str  # Outcome value
    check: Callable[[Ctx], None] | None = None  # host-side assertion; raises on failure
    detail_contains: str | None = None
    inputs: list[str] = field(default_factory=lambda: ["hello world"])


def _absent(path_attr: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        p = getattr(ctx, path_attr)
        assert not os.path.exists(p), f"{p} was created on the host"

    return check


def _in_host_dir(name: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        p = os.path.join(ctx.host_dir, name)
        assert not os.path.exists(p), f"{p} was created on the host"

    return check


def cases(ctx: Ctx) -> list[Case]:
    h = PRELUDE
    target = os.path.join(ctx.host_dir, "pwned.txt")
    out = [
        # --- processes
        Case("fork_bomb", h + "def evaluate(r):\n    os = _os()\n    while True:\n        os.fork()\n", "error"),
        Case("multiprocessing", h + "def evaluate(r):\n    mp = _imp('multiprocessing')\n"
             "    p = mp.Process(target=print)\n    p.start()\n    return True\n", "error"),
        Case("thread_outlives_call", h + "def evaluate(r):\n    th = _imp('threading')\n"
             "    th.Thread(target=lambda: [0 for _ in iter(int, 1)], daemon=True).start()\n    return True\n", "error"),
        Case("os_system", h + f"def evaluate(r):\n    return _os().system('touch {ctx.host_tmp_file}') == 0\n", "fail",
             _absent("host_tmp_file")),
        Case("subprocess_run", h + "def evaluate(r):\n    sp = _imp('subprocess')\n"
             f"    sp.run(['touch', {ctx.host_tmp_file!r}])\n    return True\n", "error", _absent("host_tmp_file")),
        Case("execv", h + "def evaluate(r):\n    _os().execv('/bin/sh', ['sh', '-c', 'true'])\n", "error"),
        Case("kill_parent", h + "def evaluate(r):\n    os = _os()\n    os.kill(os.getppid(), 9)\n    return True\n", "error"),
        Case("kill_everything", h + "def evaluate(r):\n    _os().kill(-1, 9)\n    return True\n", "error"),
        Case("kill_host_pid", h + f"def evaluate(r):\n    _os().kill({ctx.host_pid}, 9)\n    return True\n", "error"),
        Case("os__exit", h + "def evaluate(r):\n    _os()._exit(0)\n", "killed"),
        Case("sys_exit", "def evaluate(r):\n    raise SystemExit(0)\n", "error"),
        Case("keyboard_interrupt", "def evaluate(r):\n    raise KeyboardInterrupt\n", "error"),
        Case("close_result_pipe", h + "def evaluate(r):\n    _os().closerange(0, 1000)\n    return True\n", "killed"),
        # --- time
        Case("infinite_loop_python", "def evaluate(r):\n    while True:\n        pass\n", "timeout"),
        Case("infinite_loop_in_c", "def evaluate(r):\n    return sum(range(10**13)) > 0\n", "timeout"),
        Case("catastrophic_regex", "import re\n\ndef evaluate(r):\n    return re.match(r'(a+)+$', 'a' * 64 + 'b') is not None\n",
             "timeout"),
        Case("ignore_alarm_signals", h + "def evaluate(r):\n    sig = _imp('signal')\n"
             "    sig.signal(sig.SIGALRM, sig.SIG_IGN)\n    sig.signal(sig.SIGTERM, sig.SIG_IGN)\n"
             "    while True:\n        pass\n", "timeout"),
        Case("sleep_forever", h + "def evaluate(r):\n    _imp('time').sleep(3600)\n", "timeout"),
        # --- memory / size
        Case("memory_bomb_one_shot", "def evaluate(r):\n    x = 'a' * (10 ** 11)\n    return len(x) > 0\n", "error",
             detail_contains="MemoryError"),
        Case("memory_bomb_growing", "def evaluate(r):\n    xs = []\n    while True:\n        xs.append(bytes(50 * 2**20))\n",
             "error", detail_contains="MemoryError"),
        Case("recursion_bomb", "def evaluate(r):\n    return evaluate(r)\n", "error", detail_contains="RecursionError"),
        Case("nested_json_bomb", "import json\n\ndef evaluate(r):\n    return json.loads('[' * 10**6 + ']' * 10**6) is None\n",
             "error"),
        Case("huge_print", "def evaluate(r):\n    for _ in range(20):\n        print('x' * 10**7)\n    return True\n", "pass"),
        Case("huge_write_to_stdout_fd", h + "def evaluate(r):\n    os = _os()\n    for _ in range(64):\n"
             "        os.write(1, b'x' * 2**20)\n    return True\n", "killed"),
        Case("forged_results", h + "def evaluate(r):\n    _os().write(1, b'{\"t\": \"exit\", \"j\": 1}\\n{\"s\":0,\"o\":\"ppppp\"}\\n')\n"
             "    return True\n", "killed", detail_contains="protocol violation"),
        Case("forged_next_function_marker", h + "def evaluate(r):\n    _os().write(1, b'N\\n')\n    return True\n",
             "killed", detail_contains="protocol violation"),
        Case("huge_return_value", "def evaluate(r):\n    return 'x' * 10**8\n", "invalid_return"),
        Case("huge_exception_message", "def evaluate(r):\n    raise ValueError('x' * 10**7)\n", "error"),
        # --- file system
        Case("write_outside_tmp", h + f"def evaluate(r):\n    io = _imp('io')\n    with io.open({target!r}, 'w') as f:\n"
             "        f.write('pwned')\n    return True\n", "error", _in_host_dir("pwned.txt")),
        Case("write_host_tmp", h + f"def evaluate(r):\n    io = _imp('io')\n    with io.open({ctx.host_tmp_file!r}, 'w') as f:\n"
             "        f.write('pwned')\n    return True\n", "error", _absent("host_tmp_file")),
        Case("fill_private_tmp", h + "def evaluate(r):\n    io = _imp('io')\n    with io.open('/tmp/big', 'wb') as f:\n"
             "        f.write(b'x' * 2**30)\n    return True\n", "error"),
        Case("open_builtin_removed", "def evaluate(r):\n    return open('/etc/hostname').read() != ''\n", "error",
             detail_contains="NameError"),
        Case("delete_host_file", h + f"def evaluate(r):\n    _os().unlink({ctx.secret_file!r})\n    return True\n", "error"),
        Case("chmod_root", h + "def evaluate(r):\n    _os().chmod('/usr', 0o777)\n    return True\n", "error"),
        # --- secrets
        Case("read_secret_file", h + f"def evaluate(r):\n    io = _imp('io')\n    return {ctx.secret!r} in io.open({ctx.secret_file!r}).read()\n",
             "error"),
        Case("read_env_secret", h + f"def evaluate(r):\n    return _os().environ.get({ctx.secret_env!r}) == {ctx.secret!r}\n", "fail"),
        Case("scan_proc_environ", h + "def evaluate(r):\n    os = _os()\n    io = _imp('io')\n    for p in os.listdir('/proc'):\n"
             "        try:\n            data = io.open('/proc/' + p + '/environ', 'rb').read()\n        except Exception:\n"
             f"            continue\n        if {ctx.secret.encode()!r} in data:\n            return True\n    return False\n", "fail"),
        Case("see_host_process", h + f"def evaluate(r):\n    return _os().path.exists('/proc/{ctx.host_pid}/environ')\n", "fail"),
        Case("read_shadow", h + "def evaluate(r):\n    io = _imp('io')\n    return len(io.open('/etc/shadow').read()) > 0\n", "error"),
        # --- network
        Case("network_connect", h + f"def evaluate(r):\n    s = _imp('socket')\n    c = s.create_connection(('127.0.0.1', {ctx.listen_port}), 1)\n"
             "    c.sendall(b'pwned')\n    return True\n", "error"),
        Case("network_udp", h + "def evaluate(r):\n    s = _imp('socket')\n    u = s.socket(s.AF_INET, s.SOCK_DGRAM)\n"
             "    u.sendto(b'x', ('8.8.8.8', 53))\n    return True\n", "error"),
        # --- native code
        Case("ctypes_segfault", h + "def evaluate(r):\n    ct = _imp('ctypes')\n    return ct.string_at(0) == b''\n", "killed"),
        Case("ctypes_raw_socket_syscall", h + "def evaluate(r):\n    ct = _imp('ctypes')\n    libc = ct.CDLL('libc.so.6')\n"
             "    return libc.syscall(41, 2, 1, 0) >= 0\n", "fail"),
        Case("ctypes_ptrace_parent", h + "def evaluate(r):\n    ct = _imp('ctypes')\n    libc = ct.CDLL('libc.so.6')\n"
             "    return libc.ptrace(16, _os().getppid(), 0, 0) == 0\n", "fail"),
        Case("ctypes_unshare_userns", h + "def evaluate(r):\n    ct = _imp('ctypes')\n    libc = ct.CDLL('libc.so.6')\n"
             "    return libc.unshare(0x10000000) == 0\n", "fail"),
        Case("setuid_root", h + "def evaluate(r):\n    _os().setuid(0)\n    return True\n", "error"),
        # --- allow-list (policy layer)
        Case("import_os", "import os\n\ndef evaluate(r):\n    return True\n", "compile_error", detail_contains="not allowed"),
        Case("import_inside_call", "def evaluate(r):\n    import socket\n    return True\n", "error", detail_contains="not allowed"),
        # --- reading another call's input (the victim call is paired with ctx.marker as input)
        Case("read_other_input_gc", h + "M = 'MARK' + 'ER-'\n\ndef evaluate(r):\n"
             "    for o in _imp('gc').get_objects():\n        try:\n"
             "            items = o.values() if isinstance(o, dict) else o if isinstance(o, (list, tuple)) else ()\n"
             "            for x in items:\n                if isinstance(x, str) and M in x and x not in (M, r):\n"
             "                    return True\n        except Exception:\n            pass\n    return False\n", "fail"),
        Case("read_other_input_frames", h + "M = 'MARK' + 'ER-'\n\ndef evaluate(r):\n    f = _os().sys._getframe()\n"
             "    while f is not None:\n        for v in list(f.f_locals.values()):\n"
             "            if isinstance(v, (list, tuple)):\n                if any(isinstance(x, str) and M in x and x != M for x in v):\n"
             "                    return True\n            elif isinstance(v, (str, bytes, bytearray)) and v != M and (M in v if isinstance(v, str) else M.encode() in v):\n"
             "                return True\n        f = f.f_back\n    return False\n", "fail"),
    ]
    return out


# Tampering: each tamper function runs first (in the same worker), then PROBES must still pass.
TAMPER = {
    "patch_builtins_copy": "def evaluate(r):\n    __builtins__['len'] = lambda x: -1\n    return len(r) == -1\n",
    "patch_real_builtins": PRELUDE + "def evaluate(r):\n    b = _os().sys.modules['builtins']\n    b.len = lambda x: -1\n"
                           "    b.sorted = lambda *a, **k: []\n    return True\n",
    "patch_module_attr": "import re, json\n\ndef evaluate(r):\n    re.search = lambda *a, **k: None\n"
                         "    json.loads = lambda *a, **k: 'evil'\n    return True\n",
    "patch_sys_modules": PRELUDE + "def evaluate(r):\n    sysm = _os().sys.modules\n    sysm['re'] = None\n"
                         "    sysm['json'] = sysm['math']\n    return True\n",
    "patch_class_attr": "import collections\n\ndef evaluate(r):\n    collections.Counter.most_common = lambda self, n=None: [('evil', 1)]\n"
                        "    return True\n",
    "poison_re_cache": "import re\n\ndef evaluate(r):\n    for k in list(re._cache):\n        re._cache[k] = re.compile('(?!)')\n"
                       "    re.compile('hello')\n    re._cache[(str, 'hello', 0)] = re.compile('(?!)')\n    return True\n",
    "seed_random": "import random\n\ndef evaluate(r):\n    random.seed(1234)\n    return True\n",
    "raise_recursion_limit": PRELUDE + "def evaluate(r):\n    _os().sys.setrecursionlimit(50)\n    return True\n",
}

PROBES = {
    "probe_builtins": "def evaluate(r):\n    return len('abc') == 3 and sorted([2, 1]) == [1, 2]\n",
    "probe_module_attr": "import re, json\n\ndef evaluate(r):\n    return re.search('ell', 'hello') is not None and json.loads('[1]') == [1]\n",
    "probe_class_attr": "from collections import Counter\n\ndef evaluate(r):\n    return Counter('aab').most_common(1) == [('a', 2)]\n",
    "probe_re_cache": "import re\n\ndef evaluate(r):\n    return re.match('hello', 'hello world') is not None\n",
    "probe_random": "import random\n\ndef evaluate(r):\n    random.seed(1234)\n    a = random.random()\n    random.seed()\n"
                    "    return random.random() != a\n",
    "probe_recursion": "def evaluate(r):\n    def f(n):\n        return 0 if n == 0 else 1 + f(n - 1)\n    return f(200) == 200\n",
}
