"""IFEval / IFBench / FollowBench scoring: agreement with the reference implementations, offline."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pandas as pd
import pytest

from autoif.evaluation import data as evdata
from autoif.evaluation import followbench as fb
from autoif.evaluation import reference, verifiable
from autoif.evaluation.contamination import contamination_report

ROOT = Path(__file__).resolve().parents[1]
FOLLOWBENCH_FIXTURE = Path(__file__).parent / "data" / "followbench"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("autoif_cache")
    reference.ensure_nltk_data(d)
    return d


# --- varied responses -------------------------------------------------------------------------------------

FRENCH = (
    "Le ciel est bleu parce que la lumière du soleil est diffusée par les molécules de l'air. "
    "Les longueurs d'onde courtes sont diffusées davantage, c'est pourquoi nous voyons du bleu partout."
)
BODY = (
    "The answer has three parts. First, we look at the history of the question and why it matters today. "
    "Second, we weigh the evidence on each side with care. Third, we draw a short conclusion for the reader."
)


def varied_response(prompt: str, variant: int) -> str:
    """Responses that hit loose-only passes, markdown, wrong language, edge lengths, case and wrappers."""
    words = prompt.split()
    variants = [
        "",  # empty: fails strict and loose
        "ok",  # one word
        f"Sure! Here is my answer:\n**{BODY}**\nHope this helps!",  # markdown + chatty first/last lines
        FRENCH,  # wrong language
        BODY.lower(),
        BODY.upper(),
        " ".join([BODY] * 12),  # long
        f'"{BODY}"',  # wrapped in quotes
        f"Sure, here it is:\n\"{BODY}\"",  # quotes only once the first line is dropped: loose-only
        f"```json\n{json.dumps({'answer': BODY})}\n```",  # fenced JSON
        f"{BODY}\nP.S. Thanks for asking.\nIs there anything else I can help with?",
        "SECTION 1\n" + BODY + "\nSECTION 2\n" + BODY + "\n\n***\n\n* one\n* two\n* three",
        f"<<A title>>\n{BODY}\n\n{BODY}",
        " ".join(words[:60]).lower(),  # echo of the prompt, lower case
        prompt,  # echo
        f"Here you go.\n{prompt.replace(',', '')}\nAny {'more' if variant % 2 else 'other'} questions?",
    ]
    return variants[variant % len(variants)]


def _ifeval_prompts() -> pd.DataFrame:
    return evdata.load_prompts("ifeval")


# --- IFEval -----------------------------------------------------------------------------------------------


def _google_reference_verdicts(mods, prompts: pd.DataFrame, responses: pd.DataFrame):
    ev = mods["evaluation"]
    p2r = dict(zip(responses["prompt"], responses["response"]))
    strict, loose = [], []
    for rec in prompts.itertuples(index=False):
        inp = ev.InputExample(
            key=rec.key, instruction_id_list=list(rec.instruction_id_list), prompt=rec.prompt, kwargs=copy.deepcopy(rec.kwargs)
        )
        random.seed(rec.key)  # our scorer seeds with the prompt key (a few rows make the checker draw)
        strict.append(ev.test_instruction_following_strict(inp, p2r))
        random.seed(rec.key)
        loose.append(ev.test_instruction_following_loose(inp, p2r))
    return strict, loose


def _compare(ours: pd.DataFrame, prompts: pd.DataFrame, strict_ref, loose_ref) -> None:
    flat_s = [v for o in strict_ref for v in o.follow_instruction_list]
    flat_l = [v for o in loose_ref for v in o.follow_instruction_list]
    assert ours["strict"].astype(bool).tolist() == flat_s
    assert ours["loose"].astype(bool).tolist() == flat_l
    m = verifiable.metrics(ours)
    assert m["prompt_level_strict_acc"] == pytest.approx(sum(o.follow_all_instructions for o in strict_ref) / len(prompts))
    assert m["prompt_level_loose_acc"] == pytest.approx(sum(o.follow_all_instructions for o in loose_ref) / len(prompts))
    assert m["inst_level_strict_acc"] == pytest.approx(sum(flat_s) / len(flat_s))
    assert m["inst_level_loose_acc"] == pytest.approx(sum(flat_l) / len(flat_l))
    pt = verifiable.prompt_table(ours)
    assert pt["strict"].astype(bool).tolist() == [o.follow_all_instructions for o in strict_ref]
    assert pt["loose"].astype(bool).tolist() == [o.follow_all_instructions for o in loose_ref]


def test_ifeval_loads_541_prompts_offline():
    p = _ifeval_prompts()
    assert len(p) == 541
    assert p["key"].is_unique
    assert (p["instruction_id_list"].map(len) == p["kwargs"].map(len)).all()
    assert p["instruction_id_list"].map(len).sum() == 834  # IFEval's instruction count


@pytest.mark.parametrize("offset", [0, 7])
def test_ifeval_matches_google_reference_on_varied_responses(cache_dir, offset):
    prompts = _ifeval_prompts()
    responses = pd.DataFrame(
        {"prompt": prompts["prompt"], "response": [varied_response(p, i + offset) for i, p in enumerate(prompts["prompt"])]}
    )
    ours = verifiable.score_instructions(prompts, responses, "ifeval", cache_dir=cache_dir)
    assert len(ours) == 834 and ours["error"].isna().all()
    strict_ref, loose_ref = _google_reference_verdicts(reference.ifeval_modules(cache_dir), prompts, responses)
    _compare(ours, prompts, strict_ref, loose_ref)
    # the response set really exercises both modes: some instructions pass loose only, some pass strict
    assert ((ours["loose"]) & ~(ours["strict"])).sum() > 0
    assert ours["strict"].sum() > 20
    assert (~ours["loose"]).sum() > 20


def _lm_eval_ifeval_utils():
    """lm-eval's IFEval ``utils`` without running lm_eval/__init__ (which imports the whole harness)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lm-eval not installed (dev extra): the Google-reference comparison above still ran")
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, path in [("lm_eval", root), ("lm_eval.tasks", root / "tasks")]:
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(path)]  # type: ignore[attr-defined]
            sys.modules[name] = mod
    return importlib.import_module("lm_eval.tasks.ifeval.utils")


def _keys_whose_checkers_draw_random(prompts: pd.DataFrame, registry) -> set[int]:
    keys = set()
    for rec in prompts.itertuples(index=False):
        random.seed(0)
        before = random.getstate()
        for iid, kw in zip(rec.instruction_id_list, rec.kwargs):
            checker = registry[iid](iid)
            checker.build_description(**kw)
            args = checker.get_instruction_args()
            if args and "prompt" in args:
                checker.build_description(prompt=rec.prompt)
        if random.getstate() != before:
            keys.add(rec.key)
    return keys


def test_ifeval_matches_lm_eval_process_results(cache_dir):
    verifiable.score_instructions(  # loads our reference + NLTK data first: lm-eval then finds punkt_tab offline
        _ifeval_prompts().head(1), _ifeval_prompts().head(1)[["prompt"]].assign(response="x"), "ifeval", cache_dir=cache_dir
    )
    utils = _lm_eval_ifeval_utils()
    prompts = _ifeval_prompts()
    responses = pd.DataFrame(
        {"prompt": prompts["prompt"], "response": [varied_response(p, 3 * i + 1) for i, p in enumerate(prompts["prompt"])]}
    )
    # lm-eval draws strict and loose from one unseeded random stream: rows whose checker draws (kwargs the
    # checker rejects, e.g. key 1122's letter "#") are random there, so they are compared only above.
    drawing = _keys_whose_checkers_draw_random(prompts, reference.checker_registry("ifeval", cache_dir))
    assert 0 < len(drawing) <= 3
    prompts = prompts[~prompts["key"].isin(drawing)].reset_index(drop=True)
    responses = responses[responses["prompt"].isin(prompts["prompt"])].reset_index(drop=True)
    ours = verifiable.score_instructions(prompts, responses, "ifeval", cache_dir=cache_dir)
    results = [
        utils.process_results(
            {"key": r.key, "instruction_id_list": list(r.instruction_id_list), "prompt": r.prompt, "kwargs": copy.deepcopy(r.kwargs)},
            [resp],
        )
        for r, resp in zip(prompts.itertuples(index=False), responses["response"])
    ]
    m = verifiable.metrics(ours)
    n = len(results)
    assert m["prompt_level_strict_acc"] == pytest.approx(sum(x["prompt_level_strict_acc"] for x in results) / n)
    assert m["prompt_level_loose_acc"] == pytest.approx(sum(x["prompt_level_loose_acc"] for x in results) / n)
    assert m["inst_level_strict_acc"] == pytest.approx(utils.agg_inst_level_acc([x["inst_level_strict_acc"] for x in results]))
    assert m["inst_level_loose_acc"] == pytest.approx(utils.agg_inst_level_acc([x["inst_level_loose_acc"] for x in results]))
    assert ours["strict"].astype(bool).tolist() == [v for x in results for v in x["inst_level_strict_acc"]]
    assert ours["loose"].astype(bool).tolist() == [v for x in results for v in x["inst_level_loose_acc"]]


def test_loose_variants_follow_reference_order():
    v = verifiable.loose_variants("Intro line\n*body*\nOutro")
    assert v == [
        "Intro line\n*body*\nOutro", "Intro line\nbody\nOutro", "*body*\nOutro", "Intro line\n*body*", "*body*",
        "body\nOutro", "Intro line\nbody", "body",
    ]


def test_per_type_table_and_missing_responses(cache_dir):
    prompts = _ifeval_prompts().head(30)
    responses = pd.DataFrame({"prompt": prompts["prompt"], "response": [BODY.lower()] * 30})
    ours = verifiable.score_instructions(prompts, responses, "ifeval", cache_dir=cache_dir)
    t = verifiable.per_type_table(ours)
    assert t["n"].sum() == len(ours)
    lower = t.set_index("instruction_id").get("change_case:english_lowercase")
    if lower is not None:
        assert lower["strict_acc"] == 1.0  # an all-lowercase answer follows "all lowercase"
    g = verifiable.per_type_table(ours, "instruction_group")
    assert set(g["instruction_group"]) == {i.split(":")[0] for i in ours["instruction_id"]}
    with pytest.raises(verifiable.MissingResponses, match="2 of 30 prompts have no response"):
        verifiable.score_instructions(prompts, responses.iloc[2:], "ifeval", cache_dir=cache_dir)
    lenient = verifiable.score_instructions(prompts, responses.iloc[2:], "ifeval", cache_dir=cache_dir, allow_missing=True)
    assert verifiable.metrics(lenient)["n_empty_responses"] == 2


def test_load_prompts_rejects_malformed_rows(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"key": 1, "prompt": "p", "instruction_id_list": ["a", "b"], "kwargs": [{}]}) + "\n")
    with pytest.raises(evdata.EvalDataError, match=r"bad.jsonl:1: field 'kwargs'"):
        evdata.load_prompts("ifeval", bad)
    hf_style = tmp_path / "hf.jsonl"  # the Hugging Face copy pads kwargs with nulls
    hf_style.write_text(
        json.dumps({"key": 7, "prompt": "Write in lowercase.", "instruction_id_list": ["change_case:english_lowercase"],
                    "kwargs": [{"num_words": None, "relation": None}]}) + "\n"
    )
    assert evdata.load_prompts("ifeval", hf_style)["kwargs"].iloc[0] == [{}]


# --- IFBench ----------------------------------------------------------------------------------------------


def test_ifbench_sample_outputs_match_reference(cache_dir):
    prompts = evdata.load_prompts("ifbench")
    sample = evdata.load_responses(evdata.default_prompts_path("ifbench").parent / "sample_output.jsonl")
    assert len(prompts) == len(sample) == 294
    ours = verifiable.score_instructions(prompts, sample, "ifbench", cache_dir=cache_dir)
    ev = reference.ifbench_modules(cache_dir)["evaluation_lib"]
    p2r = dict(zip(sample["prompt"], sample["response"]))
    strict_ref, loose_ref, kept, raised = [], [], [], set()
    for rec in prompts.itertuples(index=False):
        inp = ev.InputExample(key=rec.key, instruction_id_list=list(rec.instruction_id_list), prompt=rec.prompt,
                              kwargs=copy.deepcopy(rec.kwargs))
        try:
            random.seed(rec.key)
            s = ev.test_instruction_following_strict(inp, p2r)
            random.seed(rec.key)
            l = ev.test_instruction_following_loose(inp, p2r)
        except LookupError:  # the reference needs NLTK data no PyPI package ships (POS tagger)
            raised.add(rec.key)
            continue
        strict_ref.append(s)
        loose_ref.append(l)
        kept.append(rec.key)
    # ours leaves exactly those prompts unscored, and says why
    unscored = set(ours.loc[ours["strict"].isna(), "key"])
    assert unscored == raised
    if not reference.nltk_resource_available("averaged_perceptron_tagger_eng"):
        assert set(ours.loc[ours["strict"].isna(), "instruction_id"]) == {"words:start_verb"}
        assert ours.loc[ours["strict"].isna(), "error"].str.contains("averaged_perceptron_tagger_eng").all()
    scored = ours[ours["key"].isin(kept)]
    _compare(scored, prompts[prompts["key"].isin(kept)], strict_ref, loose_ref)
    # and the reference's own report agrees with our headline numbers
    rep_s, rep_l = ev.generate_report(strict_ref, "strict"), ev.generate_report(loose_ref, "loose")
    m = verifiable.metrics(ours)
    assert m["prompt_level_strict_acc"] == pytest.approx(rep_s["strict:prompt-level"])
    assert m["inst_level_strict_acc"] == pytest.approx(rep_s["strict:instruction-level"])
    assert m["prompt_level_loose_acc"] == pytest.approx(rep_l["loose:prompt-level"])
    assert m["inst_level_loose_acc"] == pytest.approx(rep_l["loose:instruction-level"])
    t = verifiable.per_type_table(ours).set_index("instruction_id")
    for iid, acc in t["strict_acc"].items():
        if f"strict:{iid}" in rep_s:
            assert acc == pytest.approx(rep_s[f"strict:{iid}"]), iid
    assert 0.05 < m["inst_level_loose_acc"] < 0.95  # real model outputs: neither all pass nor all fail


def test_reference_checkers_load_without_any_download(tmp_path):
    """In a fresh process with sockets and nltk.download made to fail: both registries load and score."""
    script = textwrap.dedent(
        """
        import socket, nltk
        def no_net(*a, **k): raise RuntimeError("network used")
        socket.socket.connect = no_net
        socket.create_connection = no_net
        nltk.download = no_net
        nltk.downloader.Downloader.download = no_net
        import pandas as pd
        from autoif.evaluation import data, verifiable
        for b in ("ifeval", "ifbench"):
            p = data.load_prompts(b).head(40)
            ins = verifiable.score_instructions(p, p[["prompt"]].assign(response=p["prompt"]), b)
            print(b, len(ins), int(ins["strict"].notna().sum()))
        """
    )
    env = {**os.environ, "AUTOIF_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT), "NLTK_DATA": str(tmp_path / "none")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert set(lines) == {"ifeval", "ifbench"}
    assert (tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english" / "ortho_context.tab").exists()
    assert "network used" not in out.stderr


def test_punkt_tab_written_from_package_splits_like_punkt(cache_dir):
    import nltk

    text = "Mr. Smith arrived at 3 p.m. on Jan. 5. It rained! Did he stay? Yes."
    assert nltk.sent_tokenize(text) == ["Mr. Smith arrived at 3 p.m. on Jan. 5.", "It rained!", "Did he stay?", "Yes."]


# --- FollowBench ------------------------------------------------------------------------------------------


def _fb_responses(data: pd.DataFrame, by_level: dict) -> pd.DataFrame:
    rows = data[data["level"] >= 1]
    return pd.DataFrame({"prompt": rows["instruction"], "response": [by_level(r) for r in rows.itertuples()]})


class _Judge:
    """A stand-in judge engine (the protocol's generate); answers from a function of the prompt."""

    def __init__(self, answer):
        self.answer = answer
        self.prompts: list[str] = []

    def generate(self, prompts, n=1, temperature=0.0, max_tokens=512, seed=None, json_schema=None):
        self.prompts.extend(prompts)
        return [[self.answer(p)] for p in prompts]


def test_followbench_rules_judge_and_levels():
    data = fb.load_followbench(FOLLOWBENCH_FIXTURE)
    assert set(data["category"]) == {"content", "example"} and data["level"].between(0, 5).all()

    def response(r):
        if r.source == "gigaword":  # satisfies levels 1-3 only: contains "bus"
            return "council approves new bus route in north district"
        if r.category == "example":  # fits the template up to level 2
            return "Answer: red" + "".join(f" | rule {k}" for k in range(1, min(r.level, 2) + 1))
        return f"answer at level {r.level}"

    def judge(prompt):  # level n: the first n-1 constraints satisfied, the last not
        n = int(prompt.split("LIST with ")[1].split(" element")[0])
        return "Analysis...\n" + ("['NO']" if n == 1 else str(["YES"] * (n - 1) + ["NO"]))

    responses = _fb_responses(data, response)
    j = _Judge(judge)
    scores = fb.score_followbench(data, responses, llm=j)
    assert len(scores) == 15 and len(j.prompts) == 5  # judge only for the sharegpt example
    assert "#Initial Instruction + 3 constraints#" in j.prompts[3] and "answer at level 4" in j.prompts[3]
    giga = scores[scores["source"] == "gigaword"].set_index("level")["hard"]
    assert giga.tolist() == [1, 1, 1, 0, 0]
    ex = scores[scores["category"] == "example"].set_index("level")["hard"]
    assert ex.tolist() == [1, 1, 0, 0, 0]
    judged = scores[scores["method"] == "llm_judge"].set_index("level")
    assert judged["hard"].tolist() == [0, 0, 0, 0, 0]
    assert judged["soft"].tolist() == pytest.approx([0, 1 / 2, 2 / 3, 3 / 4, 4 / 5])
    m = fb.followbench_metrics(scores)
    assert m["hsr_level_1"] == pytest.approx(2 / 3) and m["hsr_level_3"] == pytest.approx(1 / 3)
    assert m["ssr_level_2"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["ssr_level_5"] == pytest.approx((0 + 0 + 0.8) / 3)
    assert m["csl"] == pytest.approx((3 + 2 + 0) / 3)
    assert m["n_judge_rows"] == 5 and m["n_rule_rows"] == 10 and m["n_judge_parse_errors"] == 0


def test_followbench_judge_parse_errors_are_recorded_and_judge_required():
    data = fb.load_followbench(FOLLOWBENCH_FIXTURE / "content_constraints.json")
    responses = _fb_responses(data, lambda r: "whatever")
    scores = fb.score_followbench(data, responses, llm=_Judge(lambda p: "I think it is fine."))
    judged = scores[scores["method"] == "llm_judge"]
    assert judged["judge_parse_error"].notna().all() and (judged["hard"] == 0).all()
    with pytest.raises(ValueError, match="need an LLM judge"):
        fb.score_followbench(data, responses, llm=None)


def test_parse_judgement_follows_reference():
    assert fb.parse_judgement("blah\n['YES', 'NO', 'YES']", 3) == (0, pytest.approx(2 / 3))
    assert fb.parse_judgement("x\n[YES]", 1) == (1, 1.0)
    with pytest.raises(fb.JudgementParseError):
        fb.parse_judgement("['YES', 'NO']", 3)
    with pytest.raises(fb.JudgementParseError):
        fb.parse_judgement("['YES', __import__('os')]", 2)  # never eval'd


# --- contamination ----------------------------------------------------------------------------------------


def test_contamination_flags_13gram_overlap():
    bench = _ifeval_prompts()["prompt"].head(50).tolist()
    train = pd.Series(["intro text " + bench[3], "a completely unrelated sentence about cooking pasta at home tonight",
                       " ".join(bench[10].split()[:12])])
    rep = contamination_report(train, bench, n=13)
    assert rep["contaminated"].tolist() == [True, False, False]
    assert rep["n_overlapping_ngrams"].iloc[0] > 0
