"""The foundation end to end: a real Prefect flow run writes validated Parquet and a linked MLflow run."""
import datetime as dt
import json

import pyarrow.parquet as pq
from autoif.flows.instructions import build_instructions
from autoif.tasks.seeds import read_seeds, seeds_path
from autoif.tasks.self_instruct import SELF_INSTRUCT_PROMPT, parse_instruction_lines
from mlflow import MlflowClient

from autoif.store import Store

CANNED = [
    "Sure! Here are some:\n- Answer with exactly 7 words.\n- answer in all lowercase letters,  with no capital letters at all.\n- x",
    "- Use exactly two hashtags in your response.\n- Écrivez en français uniquement s'il vous plaît, é è ê à ù ç ô",
    "I cannot think of any.",
]


def _task_runs(name: str, flow_run_ids: list[str]):
    """The task runs named ``name`` of these flow runs (the Prefect harness is shared by the whole session)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    async def fetch():
        async with get_client() as c:
            return await c.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[name])),
                                          flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)))

    return asyncio.run(fetch())


def script_for(cfg):
    seeds = read_seeds(seeds_path(cfg.self_instruct))
    prompt = SELF_INSTRUCT_PROMPT.format(seeds="\n".join(f"- {s}" for s in seeds["instruction"]))
    return [{"prompt": prompt, "outputs": CANNED}]


def test_parse_instruction_lines():
    assert parse_instruction_lines("intro\n- one thing\n* two\n3. three\nnot a line") == ["one thing", "two", "three"]


def test_flow_writes_parquet_and_mlflow_and_caches(prefect_harness, make_cfg, tmp_path):
    cfg = make_cfg({"self_instruct.n_calls": 3, "run_name": "t1"})
    cfg = make_cfg({"self_instruct.n_calls": 3, "run_name": "t1"}, script=script_for(cfg))
    refs = build_instructions(cfg, until="self_instruct")

    out = refs["self_instruct"]
    files = sorted((tmp_path / "store" / "t1" / "self_instruct" / out.key).glob("*.parquet"))
    assert files and out.uri == str(files[0].parent)
    df = pq.read_table(files[0]).to_pandas()
    kept = df[df.reason.isna()]
    assert len(kept) == 40 + 2  # the seeds plus two new instructions
    assert set(kept[kept.source == "self_instruct"].instruction) == {"Answer with exactly 7 words.", "Use exactly two hashtags in your response."}
    assert df.reason.value_counts().to_dict() == {"duplicate": 1, "too_short": 1, "non_english": 1, "no_instruction_lines": 1}

    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    parent = client.search_runs([exp.experiment_id], "tags.`autoif.flow` = 'instructions'")[0]
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.data.metrics["llm_prompts"] == 1.0
    assert parent.data.metrics["self_instruct.rows_out"] == 42 and parent.data.metrics["self_instruct.dropped.duplicate"] == 1
    step_run = client.search_runs([exp.experiment_id], "tags.`autoif.step` = 'self_instruct'")[0]
    assert step_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert step_run.data.params["n_calls"] == "3"
    ds = step_run.inputs.dataset_inputs[0].dataset
    assert json.loads(ds.source)["uri"] == out.uri and ds.digest == out.digest[:32]
    # the step run spans the step's own computation (started -> manifest written), not the logging
    m = Store(cfg.store.root).manifest("t1", "self_instruct", out.key)
    started = dt.datetime.fromisoformat(m.meta["started_at"]).timestamp() * 1000
    assert step_run.info.start_time == int(started) and step_run.info.end_time == int(
        dt.datetime.fromisoformat(m.created_at).timestamp() * 1000)
    assert step_run.data.tags["autoif.reused"] == "false"
    read = {d.dataset.name: d for d in step_run.inputs.dataset_inputs if d.dataset.name != "self_instruct"}
    seeds = refs["seeds"]
    assert read["seeds"].dataset.digest == seeds.digest[:32] and json.loads(read["seeds"].dataset.source)["uri"] == seeds.uri
    assert parent.info.run_name.startswith("t1:instructions 20")  # run name, flow and start date tell runs apart
    url = parent.data.tags.get("prefect.flow_run_url")  # a link to the server's UI, or absent (no UI): never "None/..."
    assert url is None or (url.startswith("http") and url.endswith(parent.data.tags["prefect.flow_run_id"]))
    task_runs = _task_runs("self_instruct", [parent.data.tags["prefect.flow_run_id"]])
    assert task_runs and all({f"autoif.key:{out.key}", f"autoif.uri:{out.uri}"} <= set(t.tags) for t in task_runs)

    # identical second run: every step from the cache, no LLM call, same versions
    again = build_instructions(cfg, until="self_instruct")
    assert again == refs
    runs = client.search_runs([exp.experiment_id], "tags.`autoif.flow` = 'instructions'", order_by=["start_time DESC"])
    assert len(runs) == 2 and runs[0].data.metrics["llm_requests"] == 0.0
    assert runs[0].data.metrics["self_instruct.rows_out"] == 42  # the funnel is logged for cached steps too
    again_step = client.search_runs([exp.experiment_id], "tags.`autoif.step` = 'self_instruct'",
                                    order_by=["start_time DESC"])
    latest = next(r for r in again_step if r.data.tags["mlflow.parentRunId"] == runs[0].info.run_id)  # the second run's
    assert {r.data.tags["autoif.reused"] for r in again_step} == {"false", "true"}
    assert {r.info.start_time for r in again_step} == {step_run.info.start_time}
    cached = [t for t in _task_runs("self_instruct", [runs[0].data.tags["prefect.flow_run_id"]]) if t.state_name == "Cached"]
    assert cached, "Prefect answered the second run's step from its cache, and autoif.reused says so"
    assert latest.data.tags["autoif.reused"] == "true"  # reused: the same span as the run that computed it

    # a changed self-instruct setting recomputes self_instruct but not seeds
    changed = build_instructions(make_cfg({"self_instruct.n_calls": 2, "run_name": "t1"}), until="self_instruct")
    assert changed["seeds"] == refs["seeds"] and changed["self_instruct"].key != out.key
    assert len(Store(cfg.store.root).manifests("t1")) == 3


def test_prefect_artifacts_show_the_funnel(prefect_harness, make_cfg):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    cfg = make_cfg({"self_instruct.n_calls": 0, "run_name": "art"}, script=[])
    build_instructions(cfg, until="self_instruct")
    import asyncio

    async def fetch():
        async with get_client() as c:
            return await c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["art-self-instruct", "art-instructions-funnel"])))

    arts = asyncio.run(fetch())
    assert {a.key for a in arts} >= {"art-self-instruct", "art-instructions-funnel"}
    md = next(a for a in arts if a.key == "art-instructions-funnel").data
    assert "| self_instruct | 40 | 40 | 0 |" in md


def test_max_instructions_drops_the_rest_as_over_limit():
    from autoif.flows.steps import self_instruct

    from autoif.config import load_config
    from autoif.llm.scripted import ScriptedLLM

    cfg = load_config(overrides={"self_instruct.n_calls": 3, "self_instruct.max_instructions": 41})
    seeds = read_seeds(seeds_path(cfg.self_instruct))
    llm = ScriptedLLM.from_records(script_for(cfg))
    out = self_instruct.pure(seeds=seeds, llm=llm, cfg=cfg.self_instruct, seed=0)
    kept = out[out.reason.isna()]
    assert len(kept) == 41 and kept.instruction.iloc[-1] == "Answer with exactly 7 words."
    assert out[out.reason == "over_limit"].instruction.tolist() == ["Use exactly two hashtags in your response."]
