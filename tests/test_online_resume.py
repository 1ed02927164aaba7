"""A run killed during online iteration 3 resumes at iteration 3, iterations 1 and 2 answered from the store.

The whole pipeline (stage A and B on canned outputs, SFT, offline DPO, then 3 online iterations on the tiny
Qwen2 policy) runs in a subprocess of its own process group on the session's Prefect server, with a real
on-disk store and SQLite MLflow in tmp_path. The test watches the store; as soon as ``online3_samples`` has a
manifest (iteration 3 started, its sandbox verification under way, ``online3_train`` not yet run) it
SIGKILLs the group. Then the same config runs again in a new process: it completes, every ``online1_*`` and
``online2_*`` manifest is the very one the killed run wrote (same key, URI, digest and ``created_at``: not
recomputed), ``online3_samples`` is reused too, ``online3_train`` now exists, iterations 1 and 2 each have
exactly one MLflow training run, and no process of the killed run (sandbox workers included, which live in
sessions of their own) is left.
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
from mlflow import MlflowClient

from autoif.store import MANIFEST, Store
from autoif.tracking import Tracker
from tests.conftest import descendants
from tests.test_stage_b_flow import stage_b_cfg  # noqa: F401  (fixture)
from tests.test_stage_c_flow import stage_c_cfg  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

RUN = """\
import json, sys
from autoif.config import PipelineStep, RunConfig
from autoif.flows.pipeline import autoif_pipeline

cfg = RunConfig.model_validate_json(open(sys.argv[1]).read())
refs = autoif_pipeline(cfg, until=PipelineStep.online)
with open(sys.argv[2], "w") as f:
    json.dump({k: v.model_dump(mode="json") for k, v in refs.items()}, f)
"""
RUN_TIMEOUT_S = 600


@pytest.fixture
def three_iterations(stage_c_cfg):  # noqa: F811
    return stage_c_cfg.model_validate({**stage_c_cfg.model_dump(), "online": {
        "iterations": 3, "samples_per_prompt": 6, "max_new_tokens": 6, "max_prompts": 4, "quality_gate": False,
        "dpo": {"max_steps": 1}}})


@pytest.fixture
def run_env(prefect_harness, tmp_path):
    """A pipeline subprocess's environment: the session's Prefect server (no ~20 s ephemeral start), its own
    Prefect home and result storage (shared by the killed run and the resumed one)."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results"), "PYTHONUNBUFFERED": "1"}


def _start(tmp_path: Path, env: dict, cfg_path: Path, name: str) -> tuple[subprocess.Popen, Path, Path]:
    out, log = tmp_path / f"{name}-refs.json", tmp_path / f"{name}.log"
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(cfg_path), str(out)], cwd=tmp_path, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, out, log


def _step_manifests(store: Store, run: str, prefix: tuple[str, ...]) -> dict[str, dict]:
    return {m.step: m.model_dump(mode="json") for m in store.manifests(run) if m.step.startswith(prefix)}


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a live pid; None when it is gone. A zombie counts as gone (nothing runs)."""
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


def _in_session(sid: int) -> set[int]:
    """Live processes whose session or process group is ``sid`` (the killed run's group)."""
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
    """The processes of ``procs`` (same start time: not a reused pid) or of the session still alive after
    ``timeout``, with their command lines."""
    deadline = time.monotonic() + timeout
    while True:
        alive = {p for p, (_, start) in procs.items() if (s := _stat(p)) is not None and s[1] == start} | _in_session(sid)
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


def test_killed_in_iteration_3_resumes_there(run_env, three_iterations, tmp_path):
    cfg = three_iterations
    cfg_path = tmp_path / "run-config.json"
    cfg_path.write_text(cfg.model_dump_json())
    store = Store.from_config(cfg.store)
    run_dir = Path(cfg.store.root) / cfg.run_name

    t0 = time.monotonic()
    proc, _, log = _start(tmp_path, run_env, cfg_path, "killed")
    seen_children: dict[int, tuple[str, str]] = {}
    try:
        while True:  # watch the store: iteration 3's first step done = iteration 3 under way
            if list(run_dir.glob(f"online3_samples/*/{MANIFEST}")):
                break
            for p in descendants(proc.pid):  # every process the run starts (sandbox workers: own sessions)
                if p not in seen_children and (s := _stat(p)) is not None:
                    seen_children[p] = s
            if proc.poll() is not None:
                pytest.fail(f"the run exited ({proc.returncode}) before iteration 3:\n{log.read_text()[-4000:]}")
            if time.monotonic() - t0 > RUN_TIMEOUT_S:
                pytest.fail(f"no online3_samples after {RUN_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.05)
        at_kill = {p: s for p in descendants(proc.pid) if (s := _stat(p)) is not None}
        seen_children.update(at_kill)
        own_session = {p for p in at_kill if _session(p) not in (None, proc.pid)}  # sandbox workers: setsid
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    killed_at = time.monotonic() - t0
    assert proc.returncode == -signal.SIGKILL

    left = _left_alive(seen_children, proc.pid)
    assert not left, f"processes of the killed run still alive: {left}"
    print(f"\n[resume] killed after {killed_at:.1f} s; {len(at_kill)} children alive then ({len(own_session)} in sessions "
          f"of their own: sandbox workers), {len(seen_children)} seen in all; none left")
    assert own_session, "no sandbox worker was alive at the kill: the test checks nothing about their cleanup"

    before = _step_manifests(store, cfg.run_name, ("online1_", "online2_", "online3_"))
    earlier = {k: v for k, v in before.items() if k.startswith(("online1_", "online2_"))}
    for i in (1, 2):  # iterations 1 and 2 were complete (pairs made, a DPO round trained)
        assert {f"online{i}_{s}" for s in ("samples", "verification", "contamination", "ungated", "pairs", "train")} \
            <= set(earlier), sorted(before)
    assert "online3_samples" in before and "online3_train" not in before, sorted(before)  # killed in iteration 3

    t1 = time.monotonic()
    again, refs_path, log2 = _start(tmp_path, run_env, cfg_path, "resumed")
    try:
        rc = again.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if again.poll() is None:
            os.killpg(again.pid, signal.SIGKILL)
            again.wait(timeout=30)
    resumed_s = time.monotonic() - t1
    assert rc == 0, log2.read_text()[-6000:]
    refs = json.loads(refs_path.read_text())
    print(f"[resume] resumed run took {resumed_s:.1f} s")

    after = _step_manifests(store, cfg.run_name, ("online1_", "online2_", "online3_"))
    for step, manifest in earlier.items():  # the same objects: same key, URI, digest, created_at
        assert after[step] == manifest, step
        assert (refs[step]["key"], refs[step]["uri"], refs[step]["digest"]) == \
            (manifest["key"], manifest["uri"], manifest["digest"]), step  # the resumed run used them
    assert after["online3_samples"] == before["online3_samples"]  # iteration 3's finished step: reused too
    assert "online3_train" in after and refs["online3_train"]["key"] == after["online3_train"]["key"]
    trained, _ = store.read_step(store.manifest(cfg.run_name, "online3_train", after["online3_train"]["key"]))
    assert trained["model_id"].iloc[0] == "online-3" and trained["iteration"].iloc[0] == 3
    assert trained["parent"].iloc[0] == "online-2"  # iteration 3 trained from iteration 2's model (from the store)

    client = MlflowClient(cfg.tracking.tracking_uri)
    experiment = Tracker(cfg.tracking).experiment_id
    training = "tags.`autoif.training` = 'true' and tags.`autoif.step` = '{}'"
    for i in (1, 2):  # trained once, by the killed run; the resumed run opened no training run for them
        runs = client.search_runs([experiment], training.format(f"online{i}_train"))
        assert [r.info.status for r in runs] == ["FINISHED"], [r.info for r in runs]
    assert [r.info.status for r in client.search_runs([experiment], training.format("online3_train"))] == ["FINISHED"]
    killed_run, resumed_run = client.search_runs([experiment], "tags.`autoif.flow` = 'pipeline'",
                                                 order_by=["start_time ASC"])
    assert killed_run.info.status == "RUNNING" and resumed_run.info.status == "FINISHED"  # SIGKILL: never ended
    steps = {r.data.tags["autoif.step"]: r.data.tags.get("autoif.reused") for r in client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{resumed_run.info.run_id}' and tags.`autoif.reused` != ''")}
    assert all(steps[s] == "true" for s in earlier) and steps["online3_samples"] == "true", steps
    assert steps["online3_verification"] == "false" and steps["online3_train"] == "false", steps
