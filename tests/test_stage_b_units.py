"""Stage B pieces without Prefect: query sources and their errors, seeded pairing, score parsing, the
reference agreement of synthesized functions."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from autoif.flows.steps import reference_agreement
from autoif.tasks.quality_filter import parse_score
from autoif.tasks.queries import QueryFileError, load_queries
from autoif.tasks.query_augmentation import pair_queries

from autoif.config import load_config

CFG = load_config()
GOOD = ["How do I keep basil alive indoors?", "What is the capital of Australia?", "Explain recursion to a child."]


def _cfg(**kw):
    return type(CFG.queries).model_validate({**CFG.queries.model_dump(), **kw})


def test_builtin_queries_load_offline():
    q = load_queries(CFG.queries)
    kept = q[q.reason.isna()]
    assert len(kept) >= 300 and kept["query"].str.len().between(21, 299).all() and (q.source == "builtin").all()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv", "sharegpt", "sharegpt_json", "hf_dataset"])
def test_query_sources(tmp_path, fmt):
    texts = GOOD + ["too short", "x" * 400]
    if fmt == "jsonl":
        path = tmp_path / "q.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        cfg = _cfg(path=str(path), column="text")
    elif fmt == "parquet":
        path = tmp_path / "q.parquet"
        pd.DataFrame({"query": texts}).to_parquet(path)
        cfg = _cfg(path=str(path))
    elif fmt == "csv":
        path = tmp_path / "q.csv"
        pd.DataFrame({"query": texts}).to_csv(path, index=False)
        cfg = _cfg(path=str(path))
    elif fmt.startswith("sharegpt"):
        convs = [{"conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": t},
                                    {"from": "gpt", "value": "sure"}]} for t in texts]
        path = tmp_path / ("q.json" if fmt == "sharegpt_json" else "q.jsonl")
        path.write_text(json.dumps(convs) if fmt == "sharegpt_json" else "".join(json.dumps(c) + "\n" for c in convs))
        cfg = _cfg(path=str(path), format="sharegpt")
    else:
        from datasets import Dataset

        path = tmp_path / "ds"
        Dataset.from_dict({"query": texts}).save_to_disk(str(path))
        cfg = _cfg(path=str(path))
    q = load_queries(cfg)
    assert q[q.reason.isna()]["query"].tolist() == GOOD
    assert q.reason.dropna().tolist() == ["too_short", "too_long"]


def test_bad_query_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"query": GOOD[0]}) + "\n" + json.dumps({"query": 7}) + "\n")
    with pytest.raises(QueryFileError, match=r"q\.jsonl:2: field 'query' must be a string"):
        load_queries(_cfg(path=str(path)))
    path.write_text(json.dumps({"conversations": [{"from": "gpt", "value": "hi"}]}) + "\n")
    with pytest.raises(QueryFileError, match=r"q\.jsonl:1: field 'conversations' needs a human turn"):
        load_queries(_cfg(path=str(path), format="sharegpt"))
    csv = tmp_path / "q.csv"
    csv.write_text("text\nhello there friend of mine\n")
    with pytest.raises(QueryFileError, match=r"no column 'query'.*set queries.column"):
        load_queries(_cfg(path=str(csv)))


def test_pairing_is_seeded_and_per_instruction_stable():
    queries = pd.DataFrame({"query_id": [f"q{i}" for i in range(50)], "query": [f"query number {i} here" for i in range(50)]})
    inst = pd.DataFrame({"instruction_id": ["a", "b"], "instruction": ["A.", "B."], "family": "f", "funcs": "[]",
                         "func_ids": "[]", "verifier_source": "synthesized"})
    cfg = CFG.query_augmentation.model_copy(update={"queries_per_instruction": 5})
    one = pair_queries(inst, queries, cfg, seed=0)
    assert len(one) == 10 and one.groupby("instruction_id").query_id.nunique().tolist() == [5, 5]
    assert one.equals(pair_queries(inst, queries, cfg, seed=0))  # reproducible
    assert not one.query_id.equals(pair_queries(inst, queries, cfg, seed=1).query_id)  # the seed matters
    alone = pair_queries(inst.iloc[[1]], queries, cfg, seed=0)  # b's draw does not depend on a
    assert alone.query_id.tolist() == one[one.instruction_id == "b"].query_id.tolist()


@pytest.mark.parametrize("text, score, reason", [
    ('{"analysis": "good", "score": 9}', 9.0, None),
    ("Relevant and short.\nScore: 10", 10.0, None),
    ("analysis...\n**Score: 7**", 7.0, None),
    ("I think it is fine.", None, "missing_score"),
    ('{"analysis": "x", "score": 11}', 11.0, "score_out_of_range"),
    ("Score: -1", -1.0, "score_out_of_range"),
    ('{"analysis": "x", "score": "high"}', None, "missing_score"),
    ("", None, "missing_score"),
    (None, None, "missing_score"),
])
def test_parse_score(text, score, reason):
    got, why, _ = parse_score(text)
    assert (got, why) == (score, reason)


def test_reference_agreement_scores_synthesized_functions_against_the_seed_reference():
    ref = "def evaluate(response):\n    return response == response.lower()"
    seeds = pd.DataFrame({"instruction_id": ["s1", "s2"], "instruction": ["Lowercase.", "No ref."], "family": "case",
                          "reference_func": [ref, None],
                          "reference_cases": [json.dumps([{"input": "abc", "output": True}, {"input": "ABC", "output": False}]), None]})
    same = "def evaluate(response):\n    return not any(c.isupper() for c in response)"
    wrong = "def evaluate(response):\n    return True"
    cand = pd.DataFrame({"instruction_id": ["s1", "s1", "s2"], "completion": [0, 1, 0], "func": [same, wrong, wrong],
                         "func_key": ["k1", "k2", "k3"]})
    out = reference_agreement.pure(candidates=cand, seeds=seeds, cfg=CFG.cross_validation)
    assert out.instruction_id.tolist() == ["s1", "s1"]  # s2 has no reference: not scored
    a = dict(zip(out.func_key, out.agreement))
    assert a["k1"] == 1.0 and 0 < a["k2"] < 1
