"""autoif.sandbox: API, outcomes, isolation, watchdog, allow-list, pool lifecycle (issue 4)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

from autoif.sandbox import (
    CallResult,
    Isolation,
    Outcome,
    Sandbox,
    SandboxError,
    core,
    isolation,
    shared_sandbox,
)
from autoif.sandbox.execution import normalise
from tests.conftest import descendants

SECURE = bool(isolation.which_bwrap() and isolation.pyseccomp_available() and os.getuid() == 0)
secure_only = pytest.mark.skipif(not SECURE, reason="needs bubblewrap + pyseccomp as root")


def _wait_gone(pids, timeout: float = 3.0) -> list[int]:
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if os.path.exists(f"/proc/{p}")]
        time.sleep(0.02)
    return left



@pytest.fixture(scope="module")
def sb():
    with Sandbox(workers=2, timeout_s=1.0) as s:
        yield s


# ----------------------------------------------------------------------------------------- API + outcomes
def test_full_matrix_is_row_major_and_pairs_keep_order(sb):
    funcs = ["def evaluate(r):\n    return len(r) > 3\n", "def evaluate(r):\n    return r.startswith('a')\n"]
    inputs = ["abcd", "ab", "xyz12"]
    res = sb.run(funcs, inputs)
    assert [(r.func_index, r.input_index) for r in res] == [(i, j) for i in range(2) for j in range(3)]
    assert [r.value for r in res] == [True, False, True, True, True, False]
    assert all(isinstance(r, CallResult) for r in res)
    pairs = [(1, 2), (0, 0), (1, 0), (0, 1), (1, 2)]
    res = sb.run(funcs, inputs, pairs)
    assert [(r.func_index, r.input_index) for r in res] == pairs
    assert [r.value for r in res] == [False, True, True, False, False]
    assert sb.run(funcs, inputs, []) == []
    with pytest.raises(IndexError):
        sb.run(funcs, inputs, [(2, 0)])


def test_return_values_are_normalised_explicitly(sb):
    cases = {
        "True": Outcome.passed, "False": Outcome.failed, "'true'": Outcome.passed, "'false'": Outcome.failed,
        "' True\\n'": Outcome.passed, "'FALSE'": Outcome.failed, "1": Outcome.passed, "0": Outcome.failed,
        "None": Outcome.invalid_return, "2": Outcome.invalid_return, "1.0": Outcome.invalid_return,
        "'yes'": Outcome.invalid_return, "[]": Outcome.invalid_return, "[True]": Outcome.invalid_return,
        "'1'": Outcome.invalid_return,
    }
    funcs = [f"def evaluate(r):\n    return {expr}\n" for expr in cases]
    # objects whose __eq__/__bool__ lie must not be trusted
    funcs.append("class T(int):\n    def __eq__(self, o):\n        return True\n    def __bool__(self):\n        return True\n\n"
                 "def evaluate(r):\n    return T(5)\n")
    res = sb.run(funcs, ["x"])
    assert [r.outcome for r in res] == list(cases.values()) + [Outcome.invalid_return]
    assert all(r.value is None for r in res if r.outcome is Outcome.invalid_return)
    assert "returned NoneType" in res[8].detail or "None" in res[8].detail


def test_normalise_directly():
    assert normalise(True)[0] == "p" and normalise(False)[0] == "f"
    assert normalise(1)[0] == "p" and normalise(0)[0] == "f"
    assert normalise(True + 1)[0] == "i"
    assert normalise("x" * 10**6)[0] == "i"


def test_errors_and_compile_errors(sb):
    funcs = [
        "def evaluate(r):\n    return 1 / 0\n",
        "def evaluate(r:\n",
        "def check(r):\n    return True\n",
        "evaluate = 3\n",
        "raise ValueError('at import')\n",
        "def evaluate(r):\n    return r['key']\n",
    ]
    res = sb.run(funcs, ["a", "b"])
    o = [r.outcome for r in res]
    assert o[0:2] == [Outcome.error] * 2 and "ZeroDivisionError" in res[0].detail
    assert o[2:10] == [Outcome.compile_error] * 8
    assert "SyntaxError" in res[2].detail
    assert "evaluate" in res[4].detail and "evaluate" in res[6].detail
    assert "ValueError: at import" in res[8].detail
    assert o[10:] == [Outcome.error] * 2 and "TypeError" in res[10].detail


def test_function_is_compiled_once_per_worker_not_per_call():
    src = "N = [0]\n\ndef evaluate(r):\n    N[0] += 1\n    return N[0] > 1\n"
    with Sandbox(workers=1, timeout_s=1.0) as one:
        res = one.run([src], ["a", "b", "c", "d"])
    # module code ran once: only the first call sees N == 1
    assert [r.value for r in res] == [False, True, True, True]


def test_non_string_input_is_rejected(sb):
    with pytest.raises(TypeError):
        sb.run(["def evaluate(r):\n    return True\n"], [b"bytes"])  # type: ignore[list-item]


# ----------------------------------------------------------------------------------------- watchdog
def test_timeout_kills_the_call_and_the_rest_carries_on(sb):
    funcs = [
        "def evaluate(r):\n    if r == 'loop':\n        while True:\n            pass\n    return True\n",
        "import re\n\ndef evaluate(r):\n    return re.match(r'(a+)+$', r) is not None\n",
    ]
    inputs = ["ok1", "loop", "ok2", "a" * 40 + "b"]
    t0 = time.monotonic()
    res = sb.run(funcs, inputs)
    elapsed = time.monotonic() - t0
    assert [r.outcome for r in res[:4]] == [Outcome.passed, Outcome.timeout, Outcome.passed, Outcome.passed]
    assert res[1].detail.startswith("exceeded")
    assert [r.outcome for r in res[4:]] == [Outcome.failed, Outcome.failed, Outcome.failed, Outcome.timeout]
    assert elapsed < 6
    # the pool still answers
    assert sb.run(["def evaluate(r):\n    return True\n"], ["x"])[0].value is True


def test_max_timeouts_per_func_stops_a_hopeless_function():
    with Sandbox(workers=1, timeout_s=0.3, max_timeouts_per_func=2) as s:
        t0 = time.monotonic()
        res = s.run(["def evaluate(r):\n    while True:\n        pass\n"], [str(i) for i in range(20)])
        elapsed = time.monotonic() - t0
    assert all(r.outcome is Outcome.timeout for r in res)
    # one job may already be queued in the worker when the limit is hit (pipelining)
    assert sum("not run" in r.detail for r in res) >= 16
    assert elapsed < 5


def test_module_level_infinite_loop_times_out():
    with Sandbox(workers=1, timeout_s=0.3) as s:
        res = s.run(["while True:\n    pass\n\ndef evaluate(r):\n    return True\n"], ["a", "b", "c"])
    assert [r.outcome for r in res] == [Outcome.timeout] * 3
    assert "module code" in res[0].detail


def test_process_exit_is_killed_and_pool_recovers(sb):
    exit_src = ("def evaluate(r):\n    for c in ().__class__.__base__.__subclasses__():\n"
                "        if c.__name__ == '_wrap_close':\n            c.__init__.__globals__['_exit'](3)\n")
    res = sb.run([exit_src, "def evaluate(r):\n    return r == 'b'\n"], ["a", "b"])
    assert [r.outcome for r in res] == [Outcome.killed, Outcome.killed, Outcome.failed, Outcome.passed]
    assert "status 3" in res[0].detail


# ----------------------------------------------------------------------------------------- isolation
# reaches the real `os` module through object subclasses, past the import allow-list (to test the layers below)
OS_ESCAPE = textwrap.dedent("""
    def _os():
        for c in ().__class__.__base__.__subclasses__():
            if c.__name__ == '_wrap_close':
                return c.__init__.__globals__['sys'].modules['os']
""")


@secure_only
def test_secure_mode_is_the_default_here(sb):
    assert sb.isolation is Isolation.bwrap_seccomp
    assert len(sb.worker_info) == 2
    for info in sb.worker_info:
        assert info["uid"] == 65534 and info["seccomp"] is True
    probe = OS_ESCAPE + textwrap.dedent("""

        def evaluate(r):
            os = _os()
            io = os.sys.modules['io']
            checks = {
                'uid': os.getuid() == 65534 and os.geteuid() == 65534,
                'no_host_proc': not os.path.exists('/proc/1/root/work') and len([p for p in os.listdir('/proc') if p.isdigit()]) < 10,
                'no_home': not os.path.exists('/work/main/pyproject.toml'),
                'env_clean': 'HOME' not in os.environ and len(os.environ) <= 4,
                'ro_root': not os.access('/usr', os.W_OK),
                'nofile': os.sys.modules['resource'].getrlimit(os.sys.modules['resource'].RLIMIT_NOFILE)[1] <= 64 if 'resource' in os.sys.modules else True,
            }
            bad = [k for k, v in checks.items() if not v]
            if bad:
                raise AssertionError(bad)
            return True
    """)
    res = sb.run([probe], ["x"])
    assert res[0].outcome is Outcome.passed, res[0]


def test_allow_list_is_enforced_and_configurable():
    uses_base64 = "import base64\n\ndef evaluate(r):\n    return base64.b64encode(r.encode()) == b'YQ=='\n"
    uses_json = "import json\n\ndef evaluate(r):\n    return json.loads(r) == 1\n"
    uses_os = "def evaluate(r):\n    import os\n    return True\n"
    with Sandbox(workers=1, timeout_s=1.0) as default:
        res = default.run([uses_base64, uses_json, uses_os], ["1"])
        assert res[0].outcome is Outcome.compile_error and "not allowed" in res[0].detail
        assert res[1].outcome is Outcome.passed
        assert res[2].outcome is Outcome.error and "not allowed" in res[2].detail
    with Sandbox(workers=1, timeout_s=1.0, allowed_modules=["base64"]) as custom:
        res = custom.run([uses_base64, uses_json], ["a"])
        assert res[0].outcome is Outcome.passed
        assert res[1].outcome is Outcome.compile_error and "not allowed" in res[1].detail


def test_state_does_not_leak_between_functions():
    tamper = ("import re, json, collections\n\ndef evaluate(r):\n    __builtins__['len'] = lambda x: 42\n"
              "    re.search = lambda *a, **k: None\n    json.dumps = lambda *a, **k: 'evil'\n"
              "    collections.Counter.most_common = lambda self, n=None: []\n    STASH = r\n    return len(r) == 42\n")
    probe = ("import re, json, collections\n\ndef evaluate(r):\n    return (len('ab') == 2 and re.search('b', 'ab') is not None\n"
             "            and json.dumps(1) == '1' and collections.Counter('aab').most_common(1) == [('a', 2)])\n")
    with Sandbox(workers=1, timeout_s=1.0) as s:
        res = s.run([tamper, probe, tamper, probe], ["secret input"])
    assert [r.value for r in res] == [True, True, True, True]


def test_output_is_capped():
    with Sandbox(workers=1, timeout_s=2.0, max_detail_chars=50) as s:
        res = s.run(["def evaluate(r):\n    raise ValueError('x' * 10**6)\n",
                     "def evaluate(r):\n    print('y' * 10**6)\n    return True\n"], ["a"])
    assert res[0].outcome is Outcome.error and len(res[0].detail) <= 50
    assert res[1].outcome is Outcome.passed


def test_isolation_none_runs_in_process_for_trusted_code():
    isolation._warned.discard("none")
    with pytest.warns(RuntimeWarning, match="isolation=none"):
        s = Sandbox(isolation="none")
    with s:
        assert s.worker_pids == []
        res = s.run(["import os\n\ndef evaluate(r):\n    return True\n", "def evaluate(r):\n    return r == 'a'\n"], ["a"])
    # the allow-list is still applied in-process
    assert res[0].outcome is Outcome.compile_error and res[1].value is True


def test_fallback_warns_once_and_names_the_weaker_mode(monkeypatch):
    monkeypatch.setattr(isolation, "which_bwrap", lambda: None)
    isolation._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s1 = Sandbox(workers=1, timeout_s=1.0)
        s2 = Sandbox(workers=1, timeout_s=1.0)
    try:
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(msgs) == 1, msgs
        expected = "seccomp" if isolation.pyseccomp_available() else "process"
        assert f"WEAKER isolation mode '{expected}'" in msgs[0] and "bubblewrap" in msgs[0]
        assert s1.isolation.value == expected
        assert s1.run(["def evaluate(r):\n    return True\n"], ["x"])[0].value is True
        with pytest.raises(SandboxError):
            Sandbox(isolation=Isolation.bwrap_seccomp)
    finally:
        s1.close()
        s2.close()


def test_process_mode_still_contains_basic_attacks():
    src = OS_ESCAPE + textwrap.dedent("""

        def evaluate(r):
            os = _os()
            return os.getuid() == 65534 and not os.access('/root', os.R_OK) and 'AUTOIF_T_SECRET' not in os.environ
    """)
    os.environ["AUTOIF_T_SECRET"] = "x"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Sandbox(workers=1, timeout_s=1.0, isolation="process") as s:
                res = s.run([src, "def evaluate(r):\n    while True:\n        pass\n"], ["a"])
    finally:
        del os.environ["AUTOIF_T_SECRET"]
    assert res[0].outcome is Outcome.passed, res[0]
    assert res[1].outcome is Outcome.timeout


# ----------------------------------------------------------------------------------------- pool lifecycle
def test_concurrent_runs_from_threads(sb):
    out: dict[int, list] = {}

    def go(k: int) -> None:
        funcs = [f"def evaluate(r):\n    return r.count('a') == {k}\n"]
        out[k] = [r.value for r in sb.run(funcs, ["a" * k, "b", "a" * (k + 1)])]

    threads = [threading.Thread(target=go, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out == {k: [True, k == 0, False] for k in range(6)}


def test_close_is_idempotent_and_leaves_no_process():
    before = descendants(os.getpid())
    s = Sandbox(workers=2, timeout_s=1.0)
    pids = s.worker_pids
    assert len(pids) == 2
    assert s.run(["def evaluate(r):\n    return True\n"], ["x"])[0].value is True
    tree = set(pids).union(*(descendants(p) for p in pids))
    assert len(tree) >= 4  # bwrap, its pid-namespace init, the zygote, per worker
    s.close()
    s.close()
    with pytest.raises(SandboxError):
        s.run(["def evaluate(r):\n    return True\n"], ["x"])
    for p in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(p, 0)  # reaped, not a zombie
    assert not _wait_gone(tree)
    assert descendants(os.getpid()) - before == set()


def test_shared_sandbox_is_one_pool_per_process_for_prefect_tasks():
    prefect = pytest.importorskip("prefect")

    @prefect.task
    def verify(funcs: list[str], responses: list[str]) -> list[bool | None]:
        return [r.value for r in shared_sandbox(timeout_s=1.0).run(funcs, responses)]

    try:
        a = verify.fn(["def evaluate(r):\n    return 'x' in r\n"], ["x", "y"])
        pids = shared_sandbox(timeout_s=1.0).worker_pids
        b = verify.fn(["def evaluate(r):\n    return 'y' in r\n"], ["x", "y"])
        assert shared_sandbox(timeout_s=1.0).worker_pids == pids  # same pool, not restarted per task
        assert (a, b) == ([True, False], [False, True])
    finally:
        core.close_shared_sandbox()


def test_shared_sandbox_shuts_down_cleanly_at_exit():
    code = textwrap.dedent("""
        import json
        from autoif.sandbox import shared_sandbox
        sb = shared_sandbox(workers=2, timeout_s=1.0)
        print(json.dumps({"pids": sb.worker_pids, "v": sb.run(["def evaluate(r):\\n    return True\\n"], ["a"])[0].value}))
    """)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["v"] is True and len(info["pids"]) == 2
    assert not _wait_gone(info["pids"])


def test_worker_protocol_is_json_not_pickle():
    import autoif.sandbox._worker as w

    for mod in (w, core):
        src = open(mod.__file__).read()
        assert "import pickle" not in src and "pickle.loads" not in src and "marshal" not in src


# ----------------------------------------------------------------------------------------- child reuse
# A child goes on with the next function of its job only after a function that the static purity
# check accepts (autoif/sandbox/_purity.py) and only if its dynamic check finds nothing changed;
# otherwise the next function starts in a fresh child forked from the pristine zygote.
PURE_A = "import re\n\ndef evaluate(r):\n    return re.search(r'a', r) is not None\n"
PURE_B = "from collections import Counter\n\ndef evaluate(r):\n    return Counter(r).most_common(1)[0][1] >= 1\n"
IMPURE = "import re\n\ndef evaluate(r):\n    re.search = lambda *a, **k: None\n    return True\n"


def test_pure_functions_share_a_child_impure_ones_end_it():
    with Sandbox(workers=1, timeout_s=2.0) as s:
        res = s.run([PURE_A, PURE_B, IMPURE, PURE_A, PURE_B], ["abc"])
        assert [r.value for r in res] == [True, True, True, True, True]
        # child 1: PURE_A, PURE_B, IMPURE (last: not pure); child 2: PURE_A, PURE_B
        assert s.child_stats == {"fresh": 2, "reused": 3}
    with Sandbox(workers=1, timeout_s=2.0, max_functions_per_child=1) as s:
        res = s.run([PURE_A, PURE_B, PURE_A], ["abc"])
        assert [r.value for r in res] == [True, True, True]
        assert s.child_stats == {"fresh": 3, "reused": 0}


def test_only_functions_with_the_same_inputs_share_a_child():
    with Sandbox(workers=1, timeout_s=2.0) as s:
        res = s.run([PURE_A, PURE_B], ["abc", "xyz"], pairs=[(0, 0), (1, 1), (0, 1), (1, 0)])
        assert [r.value for r in res] == [True, True, False, True]
        assert s.child_stats["reused"] == 0  # input lists differ: separate jobs, fresh children


def test_dynamic_check_falls_back_to_a_fresh_child():
    """`random` declared stateless for this test only: a function that seeds it passes the static
    check but changes the random state; the dynamic check must catch that, so the next function
    starts in a fresh child (where `random` is reseeded at fork) and never sees the planted seed."""
    import random

    plant = "import random\n\ndef evaluate(r):\n    random.seed(7)\n    return True\n"
    probe = "import random\n\ndef evaluate(r):\n    return 'x' + repr(random.random())\n"  # invalid_return: value in detail
    planted = repr(random.Random(7).random())  # what a probe would see in the planting child
    with Sandbox(workers=1, timeout_s=2.0, _extra_pure_modules=("random",)) as s:
        res = s.run([plant, probe, plant, probe], ["a"])
        assert [r.outcome for r in res] == [Outcome.passed, Outcome.invalid_return] * 2
        assert planted not in res[1].detail and planted not in res[3].detail
        # each probe started in a fresh child although the function before it passed the static check
        assert s.child_stats == {"fresh": 4, "reused": 0}
        # control: after a function that leaves the random state alone the child is reused
        res = s.run([PURE_A, probe], ["a"])
        assert res[1].outcome is Outcome.invalid_return and s.child_stats == {"fresh": 5, "reused": 1}


def test_purity_check_rejects_escapes():
    import importlib

    from autoif.sandbox import _purity

    for m in core.DEFAULT_ALLOWED_MODULES:
        importlib.import_module(m)
    policy = _purity.Policy(core.DEFAULT_ALLOWED_MODULES)
    pure = [
        PURE_A, PURE_B,
        "import json\n\ndef evaluate(response):\n    try:\n        json.loads(response)\n    except ValueError:\n        return False\n    return True\n",
        "WORDS = ['a', 'b']\n\ndef _w(t):\n    return [x for x in t.split() if x]\n\ndef evaluate(r):\n    return not any(w in r.lower() for w in WORDS) and len(_w(r)) < 9\n",
        "import unicodedata, string\n\ndef evaluate(r):\n    return sum(1 for c in r if c in string.punctuation or 'LATIN' in unicodedata.name(c, '')) > 0\n",
    ]
    impure = [
        IMPURE,
        "def evaluate(r):\n    return getattr(r, 'upper')()\n",
        "def evaluate(r):\n    return ().__class__.__base__.__subclasses__()\n",
        "def evaluate(r):\n    __builtins__['len'] = None\n",
        "def evaluate(r):\n    g = (x for x in r)\n    return g.gi_frame.f_back.f_globals\n",
        "import operator\n\ndef evaluate(r):\n    return operator.attrgetter('__class__')(r)\n",
        "import string\n\ndef evaluate(r):\n    return string.Formatter().get_field('0.__class__', [r], {})\n",
        "import re\nx = re\n\ndef evaluate(r):\n    return x.purge()\n",
        "def evaluate(r):\n    match r:\n        case str(upper=u):\n            return True\n",
        "class A:\n    pass\n\ndef evaluate(r):\n    return True\n",
        "import random\n\ndef evaluate(r):\n    return True\n",
        "import collections\n\ndef evaluate(r):\n    collections.Counter.most_common = None\n",
        "import keyword\n\ndef evaluate(r):\n    keyword.kwlist.append('x')\n",
        "import decimal\n\ndef evaluate(r):\n    decimal.getcontext().prec = 2\n",
        "import functools, re\n\ndef evaluate(r):\n    functools.update_wrapper(re.search, len)\n",
        "def evaluate(r):\n    return type(r)\n",
        "def evaluate(r):\n    yield r\n",
        "def evaluate(r:\n",
        "from json import *\n\ndef evaluate(r):\n    return True\n",
        "import os\n\ndef evaluate(r):\n    return True\n",
    ]
    assert [policy.is_pure(s) for s in pure] == [True] * len(pure)
    assert [policy.is_pure(s) for s in impure] == [False] * len(impure)


def test_dynamic_check_sees_tampering_in_process():
    import importlib
    import random
    import re

    from autoif.sandbox import _purity

    for m in core.DEFAULT_ALLOWED_MODULES:
        importlib.import_module(m)
    snap = _purity.snapshot(core.DEFAULT_ALLOWED_MODULES)
    assert _purity.unchanged(snap)
    orig_search, state = re.search, random.getstate()
    try:
        re.search = None
        assert not _purity.unchanged(snap)
    finally:
        re.search = orig_search
    assert _purity.unchanged(snap)
    try:
        random.random()
        assert not _purity.unchanged(snap)
    finally:
        random.setstate(state)
    limit = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(limit + 1)
        assert not _purity.unchanged(snap)
    finally:
        sys.setrecursionlimit(limit)
    assert _purity.unchanged(snap)


def test_big_allocation_ends_reuse():
    big = "def evaluate(r):\n    x = 'a' * (100 * 1024 * 1024)\n    return len(x) > 0\n"
    with Sandbox(workers=1, timeout_s=5.0) as s:
        res = s.run([big, PURE_A, PURE_B], ["abc"])
        assert [r.value for r in res] == [True, True, True]
        assert s.child_stats == {"fresh": 2, "reused": 1}  # PURE_A starts afresh, PURE_B reuses
