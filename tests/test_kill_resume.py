"""SIGKILL the whole pipeline (stages A and B, scripted engine) at several points, resume, lose nothing.

One clean reference run of stages A+B (until ``exports``) in its own store gives every step's key, digest
and row count. Then, in ONE other store, the same config runs in a subprocess of its own process group, is
SIGKILLed at a point inside a step, runs again, is killed at the next point, ... and finally completes (each
process is started ahead and waits, imports done, for a "go" file: the interpreter starts overlap the previous
run's work, ~5-8 s each saved on 2 cores):

- mid-batch of stage A (``cross_validation``: the sandbox runs the candidate functions): batch 1 held
  half-written (a partial ``.part-00001.parquet.*.tmp``), another batch's part on the store, no manifest;
- right after a part appears (natural timing, no hold: the store is polled every 10 ms and the run killed
  as soon as a new part or manifest shows);
- mid-batch of stage B (``verification``, sandbox workers alive) with a partial part being written;
- mid-write of a whole (non-batched) stage-B step (``contamination``: its single part half written, the
  previous step's manifest present, its own not);
- mid-write of an extra file beside the parts (``export_hf``: its parts written, its dataset card half
  written, no manifest).

A "hold" is the only instrumentation: in the child, ``Store._put`` for one chosen file writes half of its
bytes to the temporary file the store would rename into place, tells the test, and sleeps; the test then
SIGKILLs the group. Nothing else of the pipeline is changed (the data written are the same bytes).

After the last run: every step's digest, key and row count equal the clean run's (0 lost, 0 duplicated
rows); every manifest and every part of a batched step that existed at a kill is the very same file
afterwards (same inode, mtime, size; same manifest JSON, so the same ``created_at``): no finished step or
batch was recomputed; and no process of any killed group (sandbox workers included, which live in sessions
of their own) survives.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoif.config import PipelineStep
from autoif.store import MANIFEST, Store
from tests.conftest import descendants
from tests.test_stage_b_flow import stage_b_cfg  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

RUN = """\
import json, os, posixpath, sys, time
from autoif.config import PipelineStep, RunConfig
from autoif.store import Store

hold = os.environ.get("AUTOIF_TEST_HOLD")  # "<step>:<file name>" or "<step>:*extra*": hold that write
if hold:
    hold_step, hold_name = hold.split(":", 1)
    _put = Store._put

    def held_put(self, d, name, payload):
        extra = hold_name == "*extra*" and not name.startswith("part-")
        if posixpath.basename(posixpath.dirname(d)) == hold_step and (name == hold_name or extra):
            self.fs.makedirs(d, exist_ok=True)
            with open(posixpath.join(d, f".{name}.held.tmp"), "wb") as f:  # what a write cut short leaves
                f.write(payload[: len(payload) // 2])
                f.flush()
            with open(os.environ["AUTOIF_TEST_HELD"], "w") as f:
                f.write(posixpath.join(d, name))
            time.sleep(3600)  # until the SIGKILL
        return _put(self, d, name, payload)

    Store._put = held_put

from autoif.flows.pipeline import autoif_pipeline

cfg = RunConfig.model_validate_json(open(sys.argv[1]).read())
while not os.path.exists(sys.argv[3]):  # started ahead (imports done while the previous run works): wait for "go"
    time.sleep(0.01)
refs = autoif_pipeline(cfg, until=PipelineStep.exports)
with open(sys.argv[2], "w") as f:
    json.dump({k: v.model_dump(mode="json") for k, v in refs.items()}, f)
"""
RUN_TIMEOUT_S = 300
POLL_S = 0.01
BATCHED = {"verifier_synthesis", "cross_validation", "back_translation", "consistency_filter", "response_generation",
           "verification", "quality_filter"}

# (name, hold, kind): the kill points, in pipeline order; hold None = natural timing (first new file)
POINTS = [
    ("A mid-batch", "cross_validation:part-00001.parquet", "mid-batch"),
    ("right after a part appears", None, "natural"),
    ("B mid-batch", "verification:part-00001.parquet", "mid-batch"),
    ("B whole step mid-write", "contamination:part-00000.parquet", "mid-write"),
    ("B extra file mid-write", "export_hf:*extra*", "mid-write"),
]


@pytest.fixture
def run_env(prefect_harness, tmp_path):
    """A pipeline subprocess's environment: the session's Prefect server, its own Prefect home and result
    storage (shared by every run of the sequence)."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results"), "PYTHONUNBUFFERED": "1"}


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a live pid; None when it is gone (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in ("Z", "X") else (fields[0], fields[19])


def _session(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[3])
    except (FileNotFoundError, ProcessLookupError):
        return None


def _in_group(sid: int) -> set[int]:
    """Live processes whose session or process group is ``sid``."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] not in ("Z", "X") and sid in (int(fields[2]), int(fields[3])):
            out.add(int(entry))
    return out


def _left_alive(procs: dict[int, tuple[str, str]], sid: int, timeout: float = 15.0) -> dict[int, str]:
    """Those of ``procs`` (same start time: not a reused pid) or of the group still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        alive = {p for p, (_, start) in procs.items() if (s := _stat(p)) is not None and s[1] == start} | _in_group(sid)
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    cmdlines = {}
    for p in alive:
        try:
            cmdlines[p] = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmdlines[p] = "?"
    return cmdlines


def _files(run_dir: Path) -> dict[str, tuple[int, int, int]]:
    """Every file of the run's store (temporary ones included): relative path -> (inode, mtime_ns, size)."""
    out = {}
    for p in run_dir.rglob("*"):
        try:
            st = p.stat()
        except FileNotFoundError:  # renamed or removed while we looked
            continue
        if p.is_file():
            out[str(p.relative_to(run_dir))] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def _manifests(run_dir: Path) -> dict[str, str]:
    """Step dir (``step/key``) -> its manifest's JSON text."""
    out = {}
    for p in run_dir.glob(f"*/*/{MANIFEST}"):
        try:
            out[str(p.parent.relative_to(run_dir))] = p.read_text()
        except FileNotFoundError:
            continue
    return out


def _finished(files: dict[str, tuple], manifests: dict[str, str]) -> dict[str, tuple]:
    """What counts as finished at a kill: every file of a committed step, and every part of a batched step
    (a finished batch). Not a whole step's part without a manifest, nor a temporary file."""
    out = {}
    for rel, st in files.items():
        step_dir, name = rel.rsplit("/", 1)
        step = step_dir.split("/", 1)[0]
        if name.startswith("."):
            continue
        if step_dir in manifests or (step in BATCHED and name.startswith("part-") and name.endswith(".parquet")):
            out[rel] = st
    return out


class Run:
    """One pipeline process (its own process group), started ahead: it imports, then waits for :meth:`go`."""

    def __init__(self, tmp_path: Path, env: dict, cfg_path: Path, n: int, hold: str | None):
        self.n, self.hold = n, hold
        self.out, self.log, self.held, self.go_file = (tmp_path / f"run{n}-{s}" for s in ("refs.json", "log.txt", "held.txt", "go"))
        env = {**env, "AUTOIF_TEST_HELD": str(self.held)}
        if hold:
            env["AUTOIF_TEST_HOLD"] = hold
        self.proc = subprocess.Popen([sys.executable, "-c", RUN, str(cfg_path), str(self.out), str(self.go_file)],
                                     cwd=tmp_path, env=env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def go(self) -> None:
        self.go_file.touch()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_sigkill_at_several_points_then_resume(run_env, stage_b_cfg, tmp_path):  # noqa: F811
    from autoif.flows.pipeline import autoif_pipeline

    cfg = stage_b_cfg
    t_start = time.monotonic()

    # --- the kill sequence's runs (in one store), each started ahead in a process group of its own --------
    cfg_path = tmp_path / "run-config.json"
    cfg_path.write_text(cfg.model_dump_json())
    run_dir = Path(cfg.store.root) / cfg.run_name
    holds = [hold for _, hold, _ in POINTS] + [None]  # the last run: no hold, completes
    started: list[Run] = []

    def start(i: int) -> Run:
        started.append(Run(tmp_path, run_env, cfg_path, i + 1, holds[i]))
        return started[-1]

    kills: list[dict] = []
    try:
        run = start(0)  # imports while the reference run works
        # --- the clean reference run, in a store of its own (in-process: no interpreter start) -------------
        ref_cfg = cfg.model_validate({**cfg.model_dump(), "store": {**cfg.store.model_dump(), "root": str(tmp_path / "ref-store")}})
        autoif_pipeline(ref_cfg, until=PipelineStep.exports)
        reference = {m.step: m for m in Store.from_config(ref_cfg.store).manifests(ref_cfg.run_name)}
        ref_s = time.monotonic() - t_start
        assert {"cross_validation", "verification", "contamination", "export_hf"} <= set(reference), sorted(reference)
        assert reference["cross_validation"].meta["batches"] >= 2 and reference["verification"].meta["batches"] >= 2

        for i, (name, hold, kind) in enumerate(POINTS):
            following = start(i + 1)  # its interpreter starts and imports while this run works
            proc = run.proc
            before_files = _files(run_dir) if run_dir.exists() else {}
            t0 = time.monotonic()
            run.go()
            seen: dict[int, tuple[str, str]] = {}
            landed = None
            while landed is None:
                for p in descendants(proc.pid):  # every process the run starts (sandbox workers: own sessions)
                    if p not in seen and (s := _stat(p)) is not None:
                        seen[p] = s
                if hold is not None:
                    if run.held.exists() and run.held.read_text():
                        landed = run.held.read_text()
                elif run_dir.exists():
                    new = sorted(r for r in _files(run_dir) if r not in before_files and not r.rsplit("/", 1)[1].startswith("."))
                    if new:
                        landed = str(run_dir / new[0])
                if landed is None:
                    if proc.poll() is not None:
                        pytest.fail(f"run {run.n} ({name}) exited ({proc.returncode}) before its kill point:\n"
                                    f"{run.log.read_text()[-4000:]}")
                    if time.monotonic() - t0 > RUN_TIMEOUT_S:
                        pytest.fail(f"run {run.n} ({name}): no kill point after {RUN_TIMEOUT_S} s:\n{run.log.read_text()[-4000:]}")
                    time.sleep(POLL_S)
            if kind == "mid-batch":  # wait (a little) for another batch's part beside the held one
                deadline = time.monotonic() + 20
                while not list(Path(landed).parent.glob("part-*.parquet")) and time.monotonic() < deadline:
                    time.sleep(POLL_S)
            at_kill = {p: s for p in descendants(proc.pid) if (s := _stat(p)) is not None}
            seen.update(at_kill)
            files, manifests = _files(run_dir), _manifests(run_dir)  # what is there at the kill
            os.killpg(proc.pid, signal.SIGKILL)
            _kill(proc)
            assert proc.returncode == -signal.SIGKILL
            rel = str(Path(landed).relative_to(run_dir))
            step_dir = rel.rsplit("/", 1)[0]
            step = step_dir.split("/", 1)[0]
            parts = sorted(r.rsplit("/", 1)[1] for r in files if r.startswith(step_dir + "/part-"))
            tmps = sorted(r.rsplit("/", 1)[1] for r in files if r.startswith(step_dir + "/."))
            kills.append({"point": name, "kind": kind, "step": step, "file": rel.rsplit("/", 1)[1], "parts": parts,
                          "tmp": tmps, "committed": step_dir in manifests, "finished": _finished(files, manifests),
                          "manifests": manifests, "children": len(at_kill),
                          "own_session": len({p for p in at_kill if _session(p) not in (None, proc.pid)}),
                          "seconds": round(time.monotonic() - t0, 1)})
            left = _left_alive(seen, proc.pid)
            assert not left, f"processes of run {run.n} ({name}) still alive after its SIGKILL: {left}"
            if hold is not None:  # the hold was reached: inside that step, its write cut short
                assert not kills[-1]["committed"], kills[-1]
                assert any(t.startswith(f".{kills[-1]['file']}.") for t in tmps), kills[-1]
                if kind == "mid-batch":
                    assert parts, f"{name}: no finished batch beside the held one: {kills[-1]}"
            run = following

        # --- the last run: completes --------------------------------------------------------------------
        t0 = time.monotonic()
        run.go()
        rc = run.proc.wait(timeout=RUN_TIMEOUT_S)
        final_s = time.monotonic() - t0
    finally:
        for r in started:
            _kill(r.proc)
    assert rc == 0, run.log.read_text()[-6000:]
    refs = json.loads(run.out.read_text())
    locks = Path(cfg.store.root) / "_locks"
    stale = sorted(p.name for p in locks.glob("*.lock")) if locks.exists() else []
    assert not stale, f"step locks left behind: {stale}"

    # 0 lost, 0 duplicated rows: every step's version is the clean run's
    final = {m.step: m for m in Store.from_config(cfg.store).manifests(cfg.run_name)}
    assert set(final) == set(reference)
    for step, ref in reference.items():
        got = final[step]
        assert (got.key, got.digest, got.rows, got.files, got.files_extra) == \
            (ref.key, ref.digest, ref.rows, ref.files, ref.files_extra), step
    for step, r in refs.items():
        assert (r["key"], r["digest"], r["rows"]) == (final[step].key, final[step].digest, final[step].rows), step

    # nothing finished at a kill was recomputed: the same files, the same manifests (same created_at)
    now_files, now_manifests = _files(run_dir), _manifests(run_dir)
    for k in kills:
        for rel, st in k["finished"].items():
            assert now_files.get(rel) == st, f"{rel}, finished when killed at {k['point']!r}, was written again"
        for step_dir, text in k["manifests"].items():
            assert now_manifests[step_dir] == text, f"{step_dir}: manifest rewritten after the kill at {k['point']!r}"
    for k in kills:  # each killed batched step's finished batches are in its final manifest, as reused parts
        if k["kind"] == "mid-batch":
            step_dir = next(d for d in now_manifests if d.startswith(k["step"] + "/"))
            assert set(k["parts"]) <= set(json.loads(now_manifests[step_dir])["files"])

    # where the kills landed: inside distinct steps, mid-batch and mid-write among them, sandbox workers alive
    inside = {k["step"] for k in kills if not k["committed"]}
    assert len(inside) >= 3, [(k["point"], k["step"], k["committed"]) for k in kills]
    assert any(k["kind"] == "mid-batch" and k["parts"] and not k["committed"] for k in kills)
    assert any(k["kind"] == "mid-write" for k in kills)
    assert any(k["own_session"] for k in kills), "no sandbox worker was alive at any kill: their cleanup is untested"

    stray = sorted(r for r in now_files if r.rsplit("/", 1)[1].startswith("."))
    print(f"\n[kill-resume] clean reference run {ref_s:.1f} s; final run {final_s:.1f} s; total {time.monotonic() - t_start:.1f} s")
    for k in kills:
        print(f"[kill-resume] {k['point']!r}: killed after {k['seconds']} s in {k['step']} at {k['file']} "
              f"(committed={k['committed']}, parts {k['parts']}, tmp {k['tmp']}, {k['children']} children, "
              f"{k['own_session']} in own sessions)")
    print(f"[kill-resume] {len(final)} steps equal the clean run's; temporary files left in the store: {stray}")
