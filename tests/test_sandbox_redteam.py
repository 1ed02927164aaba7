"""Red-team corpus against the secure sandbox mode (issue 4, acceptance 4).

Every hostile function must get its expected outcome, every host-side check must hold, no
process of the sandbox uid may be left behind, and the pool must still answer correctly after.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import time
import uuid

import pytest
from redteam.corpus import (  # tests/ is on sys.path (rootdir import mode)
    PROBES,
    TAMPER,
    Ctx,
    cases,
)

from autoif.sandbox import Isolation, Outcome, Sandbox
from autoif.sandbox.isolation import pyseccomp_available, which_bwrap
from tests.conftest import descendants

pytestmark = pytest.mark.skipif(
    not (which_bwrap() and pyseccomp_available() and os.getuid() == 0),
    reason="secure mode needs bubblewrap + pyseccomp and root (run infra/install_sandbox_deps.sh)",
)




@pytest.fixture(scope="module")
def ctx():
    host_dir = tempfile.mkdtemp(prefix="autoif-redteam-", dir=os.path.expanduser("~"))
    secret = "s3cr3t-" + secrets.token_hex(8)
    secret_file = os.path.join(host_dir, "secret.txt")
    with open(secret_file, "w") as f:
        f.write(secret)
    os.chmod(secret_file, 0o600)
    env_name = "AUTOIF_REDTEAM_SECRET"
    os.environ[env_name] = secret
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    lsock.setblocking(False)
    c = Ctx(
        host_dir=host_dir,
        host_tmp_file=f"/tmp/autoif-redteam-{uuid.uuid4().hex}",
        secret_file=secret_file,
        secret=secret,
        secret_env=env_name,
        host_pid=os.getpid(),
        listen_port=lsock.getsockname()[1],
        marker="MARKER-" + uuid.uuid4().hex,
    )
    yield c, lsock
    lsock.close()
    os.environ.pop(env_name, None)
    shutil.rmtree(host_dir, ignore_errors=True)
    if os.path.exists(c.host_tmp_file):
        os.unlink(c.host_tmp_file)


def test_redteam_corpus(ctx):
    c, lsock = ctx
    corpus = cases(c)
    assert len(corpus) >= 30
    before = descendants(os.getpid())
    sb = Sandbox(workers=2, timeout_s=1.0, isolation=Isolation.auto, memory_mb=512)
    try:
        assert sb.isolation is Isolation.bwrap_seccomp
        # the victim: a benign function whose input holds the marker; the spies look for it
        funcs = ["def evaluate(r):\n    return r.startswith('MARKER-')\n"] + [k.src for k in corpus]
        inputs = [c.marker, "hello world"]
        pairs = [(0, 0)] + [(i + 1, 1) for i in range(len(corpus))]
        t0 = time.monotonic()
        res = sb.run(funcs, inputs, pairs)
        elapsed = time.monotonic() - t0
        assert res[0].outcome is Outcome.passed
        wrong = []
        for k, r in zip(corpus, res[1:]):
            if r.outcome.value != k.expect or (k.detail_contains and k.detail_contains not in r.detail):
                wrong.append(f"{k.name}: expected {k.expect}{' ~' + k.detail_contains if k.detail_contains else ''}, "
                             f"got {r.outcome.value} ({r.detail!r})")
            assert len(r.detail) <= sb.max_detail_chars
        assert not wrong, "\n".join(wrong)
        for k in corpus:
            if k.check is not None:
                k.check(c)
        # nothing reached the host: secret intact, listener never saw a connection, parent alive
        with open(c.secret_file) as f:
            assert f.read() == c.secret
        with pytest.raises(BlockingIOError):
            lsock.accept()
        assert os.listdir(c.host_dir) == ["secret.txt"]
        # timeouts cost about one timeout each, spread over 2 workers
        assert elapsed < 30, elapsed
        # the pool still answers correctly
        after = sb.run(["def evaluate(r):\n    return len(r) == 5\n", "def evaluate(r):\n    return 'x' in r\n"],
                       ["abcde", "xyz", "no"])
        assert [x.value for x in after] == [True, False, False, False, True, False]
        tree = set(sb.worker_pids).union(*(descendants(p) for p in sb.worker_pids))
    finally:
        sb.close()
    deadline = time.monotonic() + 3
    leftover = list(tree)
    while leftover and time.monotonic() < deadline:
        leftover = [p for p in leftover if os.path.exists(f"/proc/{p}")]
        time.sleep(0.02)
    assert not leftover, f"sandbox processes left behind: {leftover}"
    assert descendants(os.getpid()) - before == set()


def test_tampering_does_not_leak_to_the_next_function():
    """Each tamper function runs in the same worker right before the probes (one worker, one
    batch, jobs in order); every probe must still see pristine builtins, modules and classes."""
    names = list(TAMPER) + list(PROBES)
    funcs = list(TAMPER.values()) + list(PROBES.values())
    with Sandbox(workers=1, timeout_s=2.0) as sb:
        # interleave: each tamper function, then every probe, on the same worker
        pairs = []
        for t in range(len(TAMPER)):
            pairs.append((t, 0))
            pairs += [(len(TAMPER) + p, 0) for p in range(len(PROBES))]
        res = sb.run(funcs, ["hello"], pairs)
    for (fi, _), r in zip(pairs, res):
        if fi >= len(TAMPER):
            assert r.outcome is Outcome.passed, f"{names[fi]} after tampering: {r}"
        else:
            assert r.outcome in (Outcome.passed, Outcome.failed), f"{names[fi]}: {r}"


def test_spies_do_find_the_marker_without_isolation(ctx):
    """Positive control: the input-stealing spy is not vacuous; in-process (isolation=none) it
    does find the other call's input."""
    from autoif.sandbox import isolation

    c, _ = ctx
    spies = [k for k in cases(c) if k.name == "read_other_input_gc"]
    funcs = ["def evaluate(r):\n    return True\n"] + [k.src for k in spies]
    isolation._warned.discard("none")
    with pytest.warns(RuntimeWarning, match="isolation=none"):
        sb = Sandbox(isolation=Isolation.none)
    with sb:
        res = sb.run(funcs, [c.marker, "hello world"], [(0, 0), (1, 1)])
    assert res[1].outcome is Outcome.passed
