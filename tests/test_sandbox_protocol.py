"""autoif.sandbox: the parent/worker boundary (issue 9): one typed worker config as JSON, one
definition of the wire, and a worker that starts from its own directory only."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from autoif.sandbox import Sandbox, isolation, protocol
from autoif.sandbox.protocol import WorkerConfig

PACKAGE = Path(protocol.__file__).resolve().parent

CFG = WorkerConfig(
    progress_fd=5, allowed_modules=("re", "json"), seccomp=True, memory_mb=512, fsize_bytes=1 << 20, nofile=64,
    nproc=136, uid=65534, gid=65534, detail_chars=300, timeout_s=1.0, flush_interval_s=0.05,
    max_job_bytes=64 << 20, max_output_chars=1_000_000, max_functions_per_child=64, extra_pure_modules=(),
    parent_pid=1234, in_bwrap=True,
)


def test_worker_config_round_trips_as_json():
    text = CFG.to_json()
    assert isinstance(json.loads(text), dict)  # plain JSON on the command line
    assert WorkerConfig.from_json(text) == CFG
    # an int where a float is expected is fine (JSON has one number type)
    assert WorkerConfig.from_json(text.replace('"timeout_s": 1.0', '"timeout_s": 2')).timeout_s == 2.0


@pytest.mark.parametrize("change,field", [
    ({"memory_mb": "512"}, "memory_mb"),
    ({"nofile": True}, "nofile"),  # a bool is not an int here
    ({"seccomp": 1}, "seccomp"),
    ({"allowed_modules": ["re", 3]}, "allowed_modules"),
    ({"timeout_s": None}, "timeout_s"),
    ({"surprise": 1}, "surprise"),
])
def test_worker_config_rejects_wrong_fields_by_name(change, field):
    raw = {**json.loads(CFG.to_json()), **change}
    with pytest.raises(ValueError, match=field):
        WorkerConfig.from_json(json.dumps(raw))


def test_worker_config_rejects_a_missing_field_and_non_objects():
    raw = json.loads(CFG.to_json())
    del raw["uid"]
    with pytest.raises(ValueError, match="uid"):
        WorkerConfig.from_json(json.dumps(raw))
    with pytest.raises(ValueError, match="object"):
        WorkerConfig.from_json("[]")


def test_no_module_of_the_sandbox_uses_pickle_or_marshal():
    for path in PACKAGE.glob("*.py"):
        src = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(pickle|_pickle|marshal|cloudpickle|dill)\b", src, re.M), path.name
        assert "pickle.loads" not in src and "marshal.loads" not in src, path.name


def test_the_wire_structs_are_defined_once():
    defined = {p.name for p in PACKAGE.glob("*.py") if "struct.Struct(" in p.read_text()}
    assert defined == {"protocol.py"}


# reaches the worker's real sys module, past the import allow-list
_MODULES_PROBE = textwrap.dedent("""
    def evaluate(r):
        for c in ().__class__.__base__.__subclasses__():
            if c.__name__ == '_wrap_close':
                sys = c.__init__.__globals__['sys']
                mods = [m for m in sys.modules if m.startswith(('autoif', '_autoif_sandbox'))]
                raise ValueError(' '.join(sorted(mods)) + ' | ' + sys.modules['_autoif_sandbox'].__path__[0])
""")


def test_the_worker_loads_its_own_directory_only_not_the_parent_side():
    with Sandbox(workers=1, timeout_s=2.0, max_detail_chars=2000) as sb:
        (res,) = sb.run([_MODULES_PROBE], ["x"])
    mods, where = res.detail.removeprefix("ValueError: ").split(" | ")
    assert set(mods.split()) <= {"_autoif_sandbox", "_autoif_sandbox._purity", "_autoif_sandbox.execution",
                                 "_autoif_sandbox.protocol", "_autoif_sandbox.seccomp"}, mods
    assert "_autoif_sandbox.protocol" in mods.split()
    assert Path(where) == PACKAGE


@pytest.fixture
def tmp_checkout():
    copy = Path(tempfile.mkdtemp(prefix="autoif-checkout-", dir="/tmp"))
    shutil.copytree(PACKAGE.parent, copy / "autoif", ignore=shutil.ignore_patterns("__pycache__"))
    yield copy
    shutil.rmtree(copy)


def test_a_checkout_under_tmp_still_starts_its_workers(tmp_checkout):
    """The worker script and its siblings are bound read-only into bubblewrap on top of the
    worker's private /tmp: a checkout under the host's /tmp must not be hidden by it."""
    copy = tmp_checkout
    code = textwrap.dedent("""
        import json, warnings
        warnings.simplefilter("ignore")
        import autoif.sandbox as s
        with s.Sandbox(workers=1, timeout_s=2.0, max_detail_chars=2000) as sb:
            res = sb.run([PROBE, "def evaluate(r):\\n    return r == 'x'\\n"], ["x"])
            print(json.dumps({"file": s.__file__, "mode": sb.isolation.value, "detail": res[0].detail,
                              "value": res[1].value}))
    """).replace("PROBE", repr(_MODULES_PROBE))
    env = {**os.environ, "PYTHONPATH": str(copy)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd=copy)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(copy)) and out["value"] is True
    assert out["detail"].endswith(str(copy / "autoif" / "sandbox")), out
    if shutil.which("bwrap"):
        assert out["mode"].startswith("bwrap")



def test_the_seccomp_helper_reports_why_it_failed(monkeypatch):
    from autoif.sandbox import seccomp

    def broken():
        raise ImportError("libseccomp.so.2: cannot open shared object file")

    monkeypatch.setattr(seccomp, "build_seccomp_filter", broken)
    with pytest.raises(RuntimeError, match="ImportError: libseccomp.so.2: cannot open"):
        seccomp.compile_bpf_elsewhere()


@pytest.mark.skipif(not isolation.pyseccomp_available(), reason="needs pyseccomp + libseccomp")
def test_the_seccomp_helper_returns_a_bpf_program():
    from autoif.sandbox import seccomp

    nr, bpf = seccomp.compile_bpf_elsewhere()
    assert bpf and len(bpf) % 8 == 0  # struct sock_filter entries
    assert nr > 0  # the `seccomp` syscall is known here: children load the filter with SPEC_ALLOW
