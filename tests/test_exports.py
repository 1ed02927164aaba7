"""Exports of the training data, on the real stage B flow with canned LLM outputs (tests/test_stage_b_flow.py):
TRL conversational SFT and preference Parquet that TRL's trainers prepare and train on unchanged, LLaMA-Factory
alpaca JSON matching its dataset_info.json, a Hugging Face datasets directory with a card, each a versioned step
logged to MLflow as a dataset of the pipeline run, and ``autoif datasets`` listing them."""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
import yaml
from autoif.flows.data import build_data
from autoif.tasks import exports as ex
from mlflow import MlflowClient

from autoif.config import load_config
from autoif.store import FILES_ATTR, MANIFEST, Store
from tests.conftest import write_script
from tests.test_stage_a_flow import LOWER, OVERRIDES
from tests.test_stage_b_flow import Q1, Q2, Q3, Q4, RESPONSES, stage_b_script

EXPORTS = ("export_trl_sft", "export_trl_dpo", "export_llamafactory", "export_hf")
DATA_STEPS = ("stage_b_instructions", "queries", "query_augmentation", "response_generation", "verification",
              "quality_filter", "contamination", "sft", "query_dpo", "instruction_dpo")


@pytest.fixture(scope="module")
def exported(prefect_harness, tmp_path_factory):
    """Stage A and B with canned outputs, then the exports (``until=exports``); once for the module."""
    tmp = tmp_path_factory.mktemp("exports")
    queries = tmp / "queries.jsonl"
    queries.write_text("".join(json.dumps({"query": q, "category": "advice"}) + "\n"
                               for q in [Q1, Q2, "too short", Q3, Q4, Q1.upper()]))
    overrides = {**OVERRIDES, "run_name": "exports", "queries.path": str(queries),
                 "query_augmentation.queries_per_instruction": 4, "response_generation.n_responses": 4,
                 "response_generation.batch_size": 2, "verification.batch_size": 5, "quality_filter.batch_size": 3,
                 "store.root": str(tmp / "store"), "tracking.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                 "engine.kind": "scripted", "engine.scripted_path": str(tmp / "script.jsonl")}
    write_script(tmp / "script.jsonl", stage_b_script(load_config(overrides=overrides), queries))
    cfg = load_config(overrides=overrides)
    refs = build_data(cfg, until="exports")
    return cfg, refs, Store(cfg.store.root)


def _dir(store: Store, ref) -> Path:
    return Path(store.uri(ref.run, ref.step, ref.key))


def _parts(store: Store, ref) -> list[str]:
    m = store.manifest(ref.run, ref.step, ref.key)
    return [str(_dir(store, ref) / name) for name in sorted(m.files)]


def test_exports_are_versioned_steps_logged_as_datasets_of_the_run(exported):
    cfg, refs, store = exported
    manifests = {name: store.manifest(refs[name].run, refs[name].step, refs[name].key) for name in EXPORTS}
    assert all(m is not None for m in manifests.values())
    assert manifests["export_trl_sft"].rows == 5 and manifests["export_trl_dpo"].rows == 6 + 4  # query + instruction
    assert manifests["export_llamafactory"].rows == 5 + 10 and manifests["export_hf"].rows == 5 + 10
    assert set(manifests["export_llamafactory"].files_extra) == {"autoif_sft.json", "autoif_dpo.json", "dataset_info.json"}
    assert set(manifests["export_hf"].files_extra) == {"sft-00000.parquet", "dpo-00000.parquet", "README.md"}
    assert manifests["export_trl_sft"].upstream == [refs["sft"].uri]
    for m in manifests.values():  # each extra file as listed, and in the version's digest
        for name, sha in m.files_extra.items():
            assert hashlib.sha256((Path(m.uri) / name).read_bytes()).hexdigest() == sha
        assert m.digest == hashlib.sha256(json.dumps({**m.files, **m.files_extra}, sort_keys=True).encode()).hexdigest()

    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    run = client.search_runs([exp.experiment_id], "tags.`autoif.flow` = 'data'")[0]
    logged = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    for name, m in manifests.items():
        assert logged[name].digest == m.digest[:32] and json.loads(logged[name].source)["uri"] == m.uri
    assert run.data.metrics["export_trl_dpo.rows_in"] == 10 and run.data.metrics["export_trl_dpo.rows_out"] == 10

    assert build_data(cfg, until="exports") == refs  # every export reused on a re-run


def test_trl_sft_rows_and_sft_trainer(exported, tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tests.tiny_models import build_tiny_qwen2

    _, refs, store = exported
    ds = load_dataset("parquet", data_files=_parts(store, refs["export_trl_sft"]), split="train")
    assert ds.column_names == ex.TRL_SFT_COLUMNS and len(ds) == 5
    sft = store.read_step(refs["sft"])[0].set_index("sft_id")
    row = next(r for r in ds if r["messages"][1]["content"] == RESPONSES[Q1][1])
    assert row["messages"] == [{"role": "user", "content": f"{Q1}\n{LOWER}"}, {"role": "assistant", "content": RESPONSES[Q1][1]}]
    assert row["query_id"] == sft.loc[row["sft_id"], "query_id"] and row["score"] == 10.0 and row["pass_rate"] == 1.0

    model_dir = build_tiny_qwen2(tmp_path / "tiny-qwen2")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, bf16=False, save_strategy="no", logging_steps=1, learning_rate=1e-2)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(model_dir))
    assert "input_ids" in trainer.train_dataset.column_names and len(trainer.train_dataset) == 5
    trainer.train()
    assert any(not p.detach().equal(before[n]) for n, p in model.named_parameters())


def test_trl_dpo_rows_and_dpo_trainer(exported, tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from tests.tiny_models import build_tiny_qwen2

    _, refs, store = exported
    ds = load_dataset("parquet", data_files=_parts(store, refs["export_trl_dpo"]), split="train")
    assert ds.column_names == ex.TRL_DPO_COLUMNS
    levels = pd.Series(ds["level"]).value_counts().to_dict()
    assert levels == {"query": 6, "instruction": 4}
    q = next(r for r in ds if r["level"] == "query" and r["rejected"][0]["content"] == RESPONSES[Q1][2])
    assert q["prompt"] == [{"role": "user", "content": f"{Q1}\n{LOWER}"}]
    assert q["chosen"][0]["role"] == "assistant" and q["chosen"][0]["content"] in RESPONSES[Q1][:2]
    assert q["chosen_pass_rate"] == 1.0 and q["rejected_pass_rate"] == 0.0 and q["chosen_source"] and q["rejected_source"]
    i = next(r for r in ds if r["level"] == "instruction")
    assert i["prompt"] == [{"role": "user", "content": LOWER}] and i["query_id"] is None and i["chosen_score"] is None

    model_dir = build_tiny_qwen2(tmp_path / "tiny-qwen2")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, bf16=False, save_strategy="no", logging_steps=1, learning_rate=1e-2)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(model_dir))
    # trl 1.16's prepared preference columns
    assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(trainer.train_dataset.column_names)
    assert len(trainer.train_dataset) == 10
    trainer.train()
    assert any(not p.detach().equal(before[n]) for n, p in model.named_parameters())


def test_dpo_levels_choose_the_exported_pairs(exported):
    cfg, refs, store = exported
    from autoif.flows import steps

    query_dpo, instruction_dpo = (store.read_step(refs[n])[0] for n in ("query_dpo", "instruction_dpo"))
    kept = lambda f: f[f.reason.isna()].reset_index(drop=True)  # noqa: E731  the runtime passes kept rows
    only_query = cfg.exports.model_copy(update={"dpo_levels": ["query"]})
    out = steps.export_trl_dpo.pure(only_query, query_dpo=kept(query_dpo), instruction_dpo=kept(instruction_dpo))
    assert set(out.level) == {"query"} and len(out) == 6
    lf = steps.export_llamafactory.pure(only_query, sft=store.read_step(refs["sft"])[0], query_dpo=kept(query_dpo),
                                        instruction_dpo=kept(instruction_dpo))
    assert (lf["format"] == "dpo").sum() == 6 and len(json.loads(lf.attrs[FILES_ATTR]["autoif_dpo.json"])) == 6


def test_llamafactory_files_match_dataset_info(exported):
    _, refs, store = exported
    ref = refs["export_llamafactory"]
    info = json.loads(store.read_file(ref, "dataset_info.json"))
    assert set(info) == {"autoif_sft", "autoif_dpo"}
    sft_info, dpo_info = info["autoif_sft"], info["autoif_dpo"]
    assert sft_info["formatting"] == "alpaca" and "ranking" not in sft_info
    assert sft_info["columns"] == {"prompt": "instruction", "query": "input", "response": "output", "history": "history"}
    assert dpo_info["ranking"] is True and dpo_info["formatting"] == "alpaca"
    assert dpo_info["columns"] == {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}
    for entry, n in ((sft_info, 5), (dpo_info, 10)):
        raw = store.read_file(ref, entry["file_name"])
        assert hashlib.sha1(raw).hexdigest() == entry["file_sha1"]
        records = json.loads(raw)
        assert isinstance(records, list) and len(records) == n
        assert all(set(r) == set(entry["columns"].values()) for r in records)  # every column dataset_info names
    sft = json.loads(store.read_file(ref, "autoif_sft.json"))
    rec = next(r for r in sft if r["output"] == RESPONSES[Q2][0])
    assert rec == {"instruction": f"{Q2}\n{LOWER}", "input": "", "output": RESPONSES[Q2][0], "history": []}
    rows = store.read_step(ref)[0]
    assert rows["format"].value_counts().to_dict() == {"sft": 5, "dpo": 10}
    assert rows[rows.format == "dpo"]["chosen"].tolist() == [r["chosen"] for r in json.loads(store.read_file(ref, "autoif_dpo.json"))]


def test_hf_directory_loads_with_its_card(exported):
    from datasets import load_dataset

    cfg, refs, store = exported
    d = _dir(store, refs["export_hf"])
    assert (d / MANIFEST).exists() and (d / "part-00000.parquet").exists()  # not picked up by the configs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sft = load_dataset(str(d), "sft", split="train")
        dpo = load_dataset(str(d), "dpo", split="train")
    assert sft.column_names == ex.TRL_SFT_COLUMNS and len(sft) == 5
    assert dpo.column_names == ex.TRL_DPO_COLUMNS and len(dpo) == 10
    assert sft[0]["messages"][0]["role"] == "user"

    text = (d / "README.md").read_text()
    front, body = text.split("---\n")[1], text.split("---\n", 2)[2]
    meta = yaml.safe_load(front)
    assert [c["config_name"] for c in meta["configs"]] == ["sft", "dpo"]
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": "sft-*.parquet"}]
    assert meta["license"] == "other"  # the test's own query file: "see the source"
    assert f"see the source ({cfg.queries.path})" in body and "run: `exports`, preset `code`" in body
    assert "| response_generation.n_responses | 4 |" in body
    # the funnel: every data step with the counts and reasons its manifest recorded
    funnel = body.split("## Funnel", 1)[1].splitlines()
    for name in ("seeds", *DATA_STEPS):
        f = store.manifest(refs[name].run, refs[name].step, refs[name].key).meta["funnel"]
        line = next(x for x in funnel if x.startswith(f"| {name} |"))
        assert line.startswith(f"| {name} | {f['rows_in']} | {f['rows_out']} |")
    assert "| queries | 6 | 4 |" in body and "duplicate 1" in body and "too_short 1" in body
    assert "| verification | 16 | 9 | low_pass_rate 7 |" in body


def test_card_licence_of_the_builtin_queries():
    cfg = load_config(overrides={"run_name": "r"})
    facts = ex.card_facts(cfg, [{"step": "sft", "rows_in": 3, "rows_out": 2, "reasons": {"x": 1}}])
    assert facts.queries_licence == ex.BUILTIN_QUERIES_LICENCE and facts.license_id == "apache-2.0"
    cfg = load_config(overrides={"queries.path": "/data/q.jsonl", "exports.queries_licence": "CC-BY-4.0"})
    assert ex.card_facts(cfg, []).queries_licence == "CC-BY-4.0"


def test_cli_datasets_lists_the_exports(exported):
    from typer.testing import CliRunner

    from autoif.cli import app

    cfg, refs, store = exported
    result = CliRunner().invoke(app, ["datasets", "--set", f"store.root={cfg.store.root}"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in EXPORTS:
        m = store.manifest(refs[name].run, refs[name].step, refs[name].key)
        line = next(x for x in lines if f" {name} " in x)
        assert "exports" in line and m.key in line and m.digest[:12] in line and f" {m.rows} " in line
    assert f"exports/sft/{refs['sft'].key}" in result.output  # the upstream of the SFT exports, as run/step/key
    rows = [x for x in lines if x.startswith("│ exports ")]
    assert len(rows) == len(EXPORTS)  # the exports only, not the run's other steps


def test_store_writes_extra_files_before_the_manifest(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    frame = pd.DataFrame({"x": [1, 2]})
    frame.attrs[FILES_ATTR] = {"a.json": b"[1]"}
    order: list[str] = []
    real_open = store.fs.open

    def spy(path, mode="rb", **kw):
        if "w" in mode:
            order.append(Path(path).name)
        return real_open(path, mode, **kw)

    monkeypatch.setattr(store.fs, "open", spy)
    m = store.write_step(frame, "r", "s", "k")
    assert [n for n in order if not n.endswith(".tmp")][-1] == MANIFEST
    assert any(n.startswith(".a.json.") for n in order[:-1])  # written (to a temp name, renamed) before the manifest
    assert m.files_extra == {"a.json": hashlib.sha256(b"[1]").hexdigest()} and store.read_file(m, "a.json") == b"[1]"
    plain = store.write_step(pd.DataFrame({"x": [1, 2]}), "r", "s", "k2")
    assert plain.files_extra == {} and plain.digest != m.digest
    assert plain.digest == hashlib.sha256(json.dumps(plain.files, sort_keys=True).encode()).hexdigest()  # unchanged rule
    for bad in ("../x", MANIFEST, "part-00001.parquet", ".hidden"):
        with pytest.raises(ValueError, match="invalid extra file name"):
            store.write_file("r", "s", "k3", bad, b"")
    with pytest.raises(FileNotFoundError, match="no extra file"):
        store.read_file(plain, "a.json")
    assert ex.FILES_ATTR == FILES_ATTR  # the task module's copy of the key (tasks may not import the store)
