"""Side by side with AutoIF on its own data (acceptance point 9 of issue 6).

``tests/data/autoif-sample/eval_func_rft.jsonl`` (a copy of AutoIF's sample, with its licence) holds 5 instructions x 8 real completions. This script
replays them through our verifier parsing and cross-validation (scripted engine, ``code`` preset) and through
AutoIF's published cross-validation logic (``code/3_cross_validation.py`` of QwenLM/AutoIF, re-implemented
here from its behaviour: first ```json fence, strict ``json.loads``, drop lines containing "download" or
"requests", keep a function if its module code runs, exact-string dedup of functions and of (input, output)
cases, >= 3 functions and >= 10 cases, a case survives if one function returns a value ``==`` its raw
expected output, a function survives with accuracy >= 0.8, exceptions count as wrong). Both execute the
generated code in our sandbox, never in this process.

    python benchmarks/stage_a_autoif_compare.py [path/to/eval_func_rft.jsonl]
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "autoif-sample" / "eval_func_rft.jsonl"  # a copy of AutoIF's sample, with its licence


def load(path: Path = SAMPLE) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def autoif_reference(rows: list[dict], sandbox) -> list[dict]:
    """AutoIF's cross-validation decisions, per instruction and per completion."""
    from autoif.sandbox import Outcome

    out = []
    for row in rows:
        per_completion: list[dict] = []
        funcs: list[str] = []
        cases: list[tuple] = []
        for k, text in enumerate(row["gpt-answer"]):
            blocks = re.findall(r"```json(.*?)```", text, re.DOTALL)
            if not blocks:
                per_completion.append({"completion": k, "status": "no_json_fence"})
                continue
            try:
                obj = json.loads(blocks[0].strip())
            except json.JSONDecodeError:
                per_completion.append({"completion": k, "status": "invalid_json"})
                continue
            func = "\n".join(line for line in obj["func"].strip().split("\n") if "download" not in line and "requests" not in line)
            if sandbox.run([func], [""])[0].outcome is Outcome.compile_error:
                per_completion.append({"completion": k, "status": "exec_failed"})
                continue
            per_completion.append({"completion": k, "status": "parsed", "func": func})
            funcs.append(func)
            cases.extend((c["input"], c["output"]) for c in obj["cases"] if "input" in c and "output" in c)
        funcs = list(dict.fromkeys(funcs))
        cases = [tuple(c) for c in map(json.loads, dict.fromkeys(json.dumps(c) for c in cases))]
        result = {"instruction": row["instruction"], "n_funcs": len(funcs), "n_cases": len(cases), "kept": False,
                  "n_cases_kept": 0, "acc": {}, "completions": per_completion}
        if len(funcs) < 3 or len(cases) < 10:
            result["reason"] = "too_few_functions_or_cases"
            out.append(result)
            continue
        grid = sandbox.run(funcs, [str(c[0]) for c in cases])
        value = {(r.func_index, r.input_index): r.value for r in grid}
        kept = [j for j, (_, expected) in enumerate(cases)
                if any(value[i, j] is not None and value[i, j] == expected for i in range(len(funcs)))]
        for i, f in enumerate(funcs):
            hits = [value[i, j] is not None and value[i, j] == cases[j][1] for j in kept]
            result["acc"][f] = sum(hits) / len(hits) if hits else 0.0
        result["n_cases_kept"] = len(kept)
        result["kept_cases"] = [cases[j] for j in kept]
        result["kept"] = any(a >= 0.8 for a in result["acc"].values())
        result["reason"] = None if result["kept"] else "no_function_accuracy_0.8"
        out.append(result)
    return out


def ours(rows: list[dict], cfg) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Our verifier synthesis (scripted engine replaying the 8 completions) and cross-validation."""
    from autoif.flows.steps import cross_validate, synthesize_verifiers
    from autoif.tasks.ids import instruction_id
    from autoif.tasks.verifier_synthesis import verifier_prompt

    from autoif.llm.scripted import ScriptedLLM

    vcfg = cfg.verifier_synthesis.model_copy(update={"n_completions": max(len(r["gpt-answer"]) for r in rows)})
    llm = ScriptedLLM.from_prompts({verifier_prompt(r["instruction"], vcfg): r["gpt-answer"] for r in rows})
    instructions = pd.DataFrame({"instruction_id": [instruction_id(r["instruction"]) for r in rows],
                                 "instruction": [r["instruction"] for r in rows], "family": "autoif-sample"})
    candidates = synthesize_verifiers.pure(instructions=instructions, llm=llm, cfg=vcfg, seed=0)
    kept = candidates[candidates["reason"].isna()]
    validated = cross_validate.pure(candidates=kept, cfg=cfg.cross_validation)
    return candidates, validated


def table(rows: list[dict], ref: list[dict], candidates: pd.DataFrame, validated: pd.DataFrame) -> str:
    """Markdown: per instruction, then per completion (function), AutoIF's decision next to ours."""
    from autoif.tasks.ids import instruction_id

    lines = ["| # | instruction | AutoIF: funcs / cases / cases kept -> decision | ours: funcs / cases / cases kept -> decision |",
             "|---|---|---|---|"]
    for n, (row, r) in enumerate(zip(rows, ref)):
        v = validated[validated["instruction_id"] == instruction_id(row["instruction"])].iloc[0]
        lines.append(f"| {n} | {row['instruction'][:60]}... | {r['n_funcs']} / {r['n_cases']} / {r['n_cases_kept']} -> "
                     f"{'kept' if r['kept'] else 'dropped'} | {v['n_funcs']} / {v['n_cases']} / {v['n_cases_kept']} -> "
                     f"{'kept' if pd.isna(v['reason']) else 'dropped: ' + v['reason']} |")
    lines += ["", "| # | completion | AutoIF | ours |", "|---|---|---|---|"]
    for n, (row, r) in enumerate(zip(rows, ref)):
        iid = instruction_id(row["instruction"])
        v = validated[validated["instruction_id"] == iid]
        report = {f["completion"]: f for f in json.loads(v.iloc[0]["func_report"])} if len(v) else {}
        cands = candidates[candidates["instruction_id"] == iid].set_index("completion")
        for c in r["completions"]:
            k = c["completion"]
            if c["status"] != "parsed":
                theirs = c["status"]
            elif r["reason"] == "too_few_functions_or_cases":
                theirs = "instruction dropped"
            else:
                acc = r["acc"][c["func"]]
                theirs = f"acc {acc:.2f} -> {'kept' if acc >= 0.8 else 'dropped'}"
            if k in report:
                f = report[k]
                mine = (f"acc {f['accuracy']:.2f} -> " if f["accuracy"] is not None else "") + (f["reason"] or "kept")
            else:
                mine = f"unparsed: {cands.loc[k, 'reason']}"
            repairs = json.loads(cands.loc[k, "repairs"])
            lines.append(f"| {n} | {k} | {theirs} | {mine}{' (repaired: ' + ', '.join(repairs) + ')' if repairs else ''} |")
    return "\n".join(lines)


def judge_verifiability(validated: pd.DataFrame, base_url: str, model: str) -> pd.DataFrame:
    """The verifiability judge of the consistency filter (``consistency_filter.judge_verifiability``) on the
    instructions cross-validation kept, asked of a real OpenAI-compatible server."""
    from autoif.tasks.consistency_filter import _judge_verifiability

    from autoif.config import load_config
    from autoif.llm import make_llm

    cfg = load_config(preset="code", overrides={"engine.kind": "openai", "engine.base_url": base_url, "engine.model": model,
                                                "consistency_filter.judge_verifiability": True,
                                                "consistency_filter.max_tokens": 96})
    rows = [{"instruction": r.instruction, "funcs": r.funcs, "reason": None} for r in validated[validated["reason"].isna()].itertuples()]
    _judge_verifiability(rows, make_llm(cfg.engine), cfg.consistency_filter, seed=0)
    return pd.DataFrame(rows)


def main() -> None:
    import argparse

    from autoif.config import load_config
    from autoif.sandbox import Sandbox

    ap = argparse.ArgumentParser()
    ap.add_argument("path", nargs="?", default=str(SAMPLE))
    ap.add_argument("--judge-url", help="also ask this OpenAI-compatible server the verifiability judgement")
    ap.add_argument("--judge-model", default="gemma3-270m")
    args = ap.parse_args()
    rows = load(Path(args.path))
    cfg = load_config(preset="code", overrides={"cross_validation.timeout_s": 5.0})  # AutoIF's own limit; robust on a loaded machine
    with Sandbox(timeout_s=cfg.cross_validation.timeout_s) as sb:
        ref = autoif_reference(rows, sb)
    candidates, validated = ours(rows, cfg)
    print(table(rows, ref, candidates, validated))
    if args.judge_url:
        judged = judge_verifiability(validated, args.judge_url, args.judge_model)
        print("\n| instruction | verdict | reason |\n|---|---|---|")
        for r in judged.itertuples():
            print(f"| {r.instruction[:60]}... | {r.reason or 'kept'} | {json.loads(r.verifiability)['reason'][:80]!r} |")
        print(f"verifiability.judged = {len(judged)}")
        print(f"verifiability.dropped = {int(judged['reason'].notna().sum())}")
        for reason, n in judged["reason"].value_counts().items():
            print(f"verifiability.dropped.{reason} = {n}")


if __name__ == "__main__":
    main()
