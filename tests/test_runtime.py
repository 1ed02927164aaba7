"""The step runtime: plain task modules, keys that cover a step's own code, parallel batches with outputs equal
to a sequential run, a local Dask cluster giving the same rows and digests, Prefect results on S3."""
from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import autoif.tasks
import pandas as pd
import pytest
from autoif.flows.instructions import build_instructions
from mlflow import MlflowClient

from autoif.store import Store
from tests.test_stage_a_flow import OVERRIDES, script

TASK_MODULES = sorted(f"autoif.tasks.{m.name}" for m in pkgutil.iter_modules(autoif.tasks.__path__))
FORBIDDEN = ("prefect", "mlflow", "autoif.store", "autoif.runtime", "autoif.tracking", "autoif.steps")


@pytest.mark.parametrize("module", TASK_MODULES)
def test_task_modules_import_no_orchestration(module):
    """A task is a plain function of frames and config: importing its module loads neither Prefect, the
    store, the runtime nor MLflow (a fresh interpreter per module)."""
    code = (f"import sys, {module}; bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow') "
            f"or m in {FORBIDDEN!r}]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"{module} imports {out.stdout.strip()}"


def test_step_keys_cover_their_own_code_and_helpers_only():
    from autoif.flows import steps

    def modules(step):
        from autoif.runtime.spec import _imported_code_modules, module_source

        return _imported_code_modules(step.spec.fn.__module__, module_source(step.spec.fn.__module__))

    assert modules(steps.back_translate) == {"autoif.tasks.batching", "autoif.tasks.json_repair"}
    assert "autoif.tasks.back_translation" not in modules(steps.synthesize_verifiers)


def _stage_a_cfg(make_cfg, **extra):
    cfg = make_cfg({**OVERRIDES, **extra})
    return make_cfg({**OVERRIDES, **extra}, script=script(cfg))


def _outputs(store: Store, refs: dict) -> dict:
    return {name: (ref.digest, ref.rows, store.manifest(ref.run, ref.step, ref.key).meta["funnel"]) for name, ref in refs.items()}


def test_changed_back_translation_prompt_recomputes_it_and_what_follows_not_synthesis(prefect_harness, make_cfg,
                                                                                       monkeypatch):
    """Editing the back-translation prompt (its module's source and behaviour) changes the keys of
    back-translation and the consistency filter; verifier synthesis and cross-validation are reused."""
    from autoif.tasks import back_translation as bt

    from autoif.runtime import spec as spec_mod
    from tests.test_stage_a_flow import (
        APPLE,
        CHERRY,
        JUDGE_PROMPT,
        LOWER,
        LOWER_FUNCS,
        MANGO,
        word_funcs,
    )

    old, new = "one plain English sentence", "one short English sentence"
    new_prompt = bt.BACK_TRANSLATION_PROMPT.replace(old, new)
    survivors = {LOWER: LOWER_FUNCS[:2], APPLE: word_funcs("apple"), CHERRY: word_funcs("cherry"), MANGO: word_funcs("mango")}
    cfg = make_cfg({**OVERRIDES, "run_name": "edit-bt"})
    records = script(cfg)  # the script holds the edited prompt's answers from the start: the engine is the same
    for instruction, funcs in survivors.items():
        text = f"Check: {instruction}"
        listing = "\n\n".join(f"Function {i + 1}:\n```python\n{f}\n```" for i, f in enumerate(funcs))
        records.append({"prompt": new_prompt.format(funcs=listing), "outputs": [json.dumps({"instructions": [text]})]})
        records.append({"prompt": JUDGE_PROMPT.format(premise=instruction, hypothesis=text),
                        "outputs": ['{"label": "entailment"}']})
    cfg = make_cfg({**OVERRIDES, "run_name": "edit-bt"}, script=records)
    refs = build_instructions(cfg)

    real_source = spec_mod.module_source
    monkeypatch.setattr(bt, "BACK_TRANSLATION_PROMPT", new_prompt)
    monkeypatch.setattr(spec_mod, "module_source",
                        lambda m: real_source(m).replace(old, new) if m == bt.__name__ else real_source(m))
    edited = build_instructions(cfg)
    for name in ("seeds", "self_instruct", "verifier_synthesis", "cross_validation"):
        assert edited[name] == refs[name], name
    for name in ("back_translation", "consistency_filter"):
        assert edited[name].key != refs[name].key, name
    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    last = client.search_runs([exp.experiment_id], "tags.`autoif.run_name` = 'edit-bt'", order_by=["start_time DESC"])[0]
    assert last.data.metrics["llm_prompts"] == len(survivors) * 2  # back-translation + judge; no synthesis prompt
    assert bt.back_translation_prompt(["x"]) != new_prompt  # sanity: the edited prompt is what ran
    final = Store(cfg.store.root).read_step(edited["consistency_filter"])[0]
    assert final.reason.isna().sum() == len(survivors)


def test_parallel_batches_write_the_same_outputs_as_sequential(prefect_harness, make_cfg, tmp_path):
    seq = _stage_a_cfg(make_cfg, run_name="par", **{"runtime.max_batches_in_flight": 1})
    a = build_instructions(seq)
    par = seq.model_copy(update={"store": seq.store.model_copy(update={"root": str(tmp_path / "store-par")}),
                                 "runtime": seq.runtime.model_copy(update={"max_batches_in_flight": 3})})
    b = build_instructions(par)
    assert _outputs(Store(seq.store.root), a) == _outputs(Store(par.store.root), b)
    m = Store(par.store.root).manifest("par", "verifier_synthesis", b["verifier_synthesis"].key)
    assert list(m.files) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # batch order
    assert m.meta["batches"] == 3 and m.meta["usage"]["llm_prompts"] == 8


def test_finished_parts_are_not_computed_again(tmp_path):
    """A batch whose part is on the store (finished before a crash) is answered from it: no LLM call."""
    from autoif.flows import steps
    from autoif.tasks.verifier_synthesis import verifier_prompt

    from autoif.config import load_config
    from autoif.runtime.execute import run_batch
    from tests.conftest import write_script

    cfg = load_config(overrides={"store.root": str(tmp_path / "store"), "engine.kind": "scripted",
                                 "engine.scripted_path": str(tmp_path / "s.jsonl"), "run_name": "parts"})
    text = '```json\n{"func": "def evaluate(response):\\n    return True", "cases": []}\n```'
    write_script(tmp_path / "s.jsonl", [{"prompt": verifier_prompt("Say hi.", cfg.verifier_synthesis), "outputs": [text]}])
    batch = pd.DataFrame({"instruction_id": ["i"], "instruction": ["Say hi."], "family": ["f"], "reason": [None]})
    first = run_batch(steps.synthesize_verifiers.spec, cfg, "k1", 0, batch)
    assert not first.reused and first.usage["llm_prompts"] == 1 and first.part.rows == 8
    write_script(tmp_path / "s.jsonl", [])  # any LLM call would now raise
    again = run_batch(steps.synthesize_verifiers.spec, cfg, "k1", 0, batch)
    assert again.reused and again.part == first.part and again.usage == {}
    assert not list((tmp_path / "store" / "parts" / "verifier_synthesis" / "k1").glob(".*tmp"))  # no temp left


@pytest.mark.slow
def test_stage_a_on_a_local_dask_cluster_equals_the_thread_runner(prefect_harness, make_cfg, tmp_path):
    """Stage A with the scripted engine on a local Dask cluster of 2 worker processes: same rows, digests and
    funnel as the default thread runner; the batch task runs ran in the workers' processes."""
    import os

    from autoif.flows.pipeline import run_pipeline

    from autoif.config import TaskRunnerKind

    threads = _stage_a_cfg(make_cfg, run_name="dask")
    a = run_pipeline(threads, until="consistency_filter")
    dask = threads.model_copy(update={
        "store": threads.store.model_copy(update={"root": str(tmp_path / "store-dask")}),
        "runtime": threads.runtime.model_copy(update={"task_runner": TaskRunnerKind.dask, "workers": 2})})
    b = run_pipeline(dask, until="consistency_filter")
    assert _outputs(Store(threads.store.root), a) == _outputs(Store(dask.store.root), b)
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    async def batch_runs():
        async with get_client() as c:
            return await c.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=["verifier_synthesis[0]"])))

    # the workers reported to the flow's Prefect server (not each to an ephemeral server of its own)
    assert len(asyncio.run(batch_runs())) >= 2
    here = f":{os.getpid()}"
    m = Store(threads.store.root).manifest("dask", "verifier_synthesis", a["verifier_synthesis"].key)
    assert all(p.endswith(here) for p in m.meta["processes"])  # threads of this process
    m = Store(dask.store.root).manifest("dask", "verifier_synthesis", b["verifier_synthesis"].key)
    assert m.meta["processes"] and not any(p.endswith(here) for p in m.meta["processes"])  # Dask worker processes


@pytest.mark.slow
def test_s3_store_puts_prefect_results_in_the_bucket(prefect_harness, make_cfg, s3_server):
    import boto3

    cfg = _stage_a_cfg(make_cfg, run_name="s3res", **{"store.root": "s3://autoif-test/runtime",
                                                       "store.s3_endpoint_url": s3_server})
    refs = build_instructions(cfg, until="verifier_synthesis")
    assert refs["verifier_synthesis"].uri.startswith("s3://autoif-test/runtime/s3res/verifier_synthesis/")
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
        Bucket="autoif-test", Prefix="runtime/_prefect_results/").get("Contents", [])]
    assert len(keys) >= 3 + 1 + 2  # synthesis batches + commit + seeds, self_instruct results
    # a result is small: a reference and counts, never the batch's rows
    body = boto3.client("s3", endpoint_url=s3_server).get_object(Bucket="autoif-test", Key=keys[0])["Body"].read()
    assert len(body) < 20_000


def test_a_deleted_store_is_recomputed_not_served_from_prefects_cache(prefect_harness, make_cfg):
    """Prefect's cache outlives the store (a user deletes .autoif/store, keeps PREFECT_HOME): the steps whose
    manifests and parts are gone are recomputed, with the same outputs."""
    import shutil

    cfg = _stage_a_cfg(make_cfg, run_name="gone")
    a = build_instructions(cfg, until="verifier_synthesis")
    before = _outputs(Store(cfg.store.root), a)
    shutil.rmtree(cfg.store.root)
    b = build_instructions(cfg, until="verifier_synthesis")
    assert _outputs(Store(cfg.store.root), b) == before
