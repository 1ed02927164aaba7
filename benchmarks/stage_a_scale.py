"""Stage A at scale (acceptance point 10 of issue 6): N synthetic instructions through the real flow with the
scripted engine, streaming in batches; prints wall time per phase and peak RSS.

    python benchmarks/stage_a_scale.py --instructions 20000 [--completions 4] [--batch 256] [--workdir DIR]

Synthetic data: self-instruct returns N distinct instructions ("Use the word <w> ..." with random vocabulary,
so near-duplicate detection has real work and no false hits); each instruction gets K canned completions
holding four equivalent keyword checks and 3 test cases each (different source per instruction, so nothing
is shared between sandbox calls); back-translation and the LLM judge answer every prompt. All generated
code runs in the sandbox. The scripted engine keeps its whole script in memory; its size is printed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path


def words(rng: random.Random, n: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(4, 9))) for _ in range(n)]


def funcs_for(w: str) -> list[str]:
    return [f"def evaluate(response):\n    return '{w}' in response",
            f"def evaluate(response):\n    return response.count('{w}') >= 1",
            f"def evaluate(response):\n    return response.find('{w}') != -1",
            f"def evaluate(response):\n    return '{w}' in response.lower()"]


def build_script(cfg, n: int, k: int, path: Path) -> tuple[int, float]:
    from autoif.tasks.back_translation import back_translation_prompt
    from autoif.tasks.consistency_filter import JUDGE_PROMPT
    from autoif.tasks.seeds import read_seeds, seeds_path
    from autoif.tasks.self_instruct import SELF_INSTRUCT_PROMPT
    from autoif.tasks.verifier_synthesis import verifier_prompt

    rng = random.Random(0)
    vocab = words(rng, 5000)
    seeds = read_seeds(seeds_path(cfg.self_instruct))
    per_call = 50
    lines = []
    for i in range(n):
        a, b, c = rng.sample(vocab, 3)
        lines.append(f"Use the word {a}{i} while writing about {b} and {c}, in at most {rng.randint(2, 9)} sentences.")
    calls = ["\n".join(f"- {t}" for t in lines[j : j + per_call]) for j in range(0, n, per_call)]

    def rec(prompt: str, outputs: list[str]) -> str:
        return json.dumps({"prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(), "outputs": outputs}) + "\n"

    with path.open("w") as f:
        f.write(rec(SELF_INSTRUCT_PROMPT.format(seeds="\n".join(f"- {s}" for s in seeds["instruction"])), calls))
        for t in list(seeds["instruction"]) + lines:
            w = t.split()[3] if t.startswith("Use the word ") else "zzzz"
            fs = funcs_for(w)
            outs = []
            for j in range(k):
                cases = [{"input": f"text with {w} number {j}", "output": True}, {"input": f"{w} first {j}", "output": True},
                         {"input": f"nothing at all {j}", "output": False}]
                outs.append("```json\n" + json.dumps({"func": fs[j % 4], "cases": cases}) + "\n```")
            f.write(rec(verifier_prompt(t, cfg.verifier_synthesis), outs))
            bts = [f"Include the word {w}.", f"Mention {w}.", f"Use {w} somewhere."]
            f.write(rec(back_translation_prompt(fs[: min(k, cfg.back_translation.max_funcs)]), [json.dumps({"instructions": bts})]))
            for h in bts:
                f.write(rec(JUDGE_PROMPT.format(premise=t, hypothesis=h), ['{"label": "entailment"}']))
    return n + len(seeds), path.stat().st_size / 2**20


def rss_mb() -> tuple[float, float]:
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instructions", type=int, default=20_000)
    ap.add_argument("--completions", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="autoif-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    from autoif.config import load_config

    overrides = {
        "run_name": "scale", "store.root": str(work / "store"), "tracking.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "engine.kind": "scripted", "engine.scripted_path": str(work / "script.jsonl"),
        "self_instruct.n_calls": -(-args.instructions // 50), "self_instruct.max_chars": 300,
        "verifier_synthesis.n_completions": args.completions, "verifier_synthesis.batch_size": args.batch,
        "cross_validation.batch_size": args.batch, "back_translation.batch_size": args.batch,
        "consistency_filter.batch_size": args.batch, "consistency_filter.mode": "llm_judge",
    }
    cfg = load_config(preset="code", overrides=overrides)
    t0 = time.perf_counter()
    n_total, script_mb = build_script(cfg, args.instructions, args.completions, work / "script.jsonl")
    t_script = time.perf_counter() - t0
    print(f"script: {n_total} instructions, {script_mb:.1f} MiB canned outputs, built in {t_script:.1f}s; RSS {rss_mb()[0]:.0f} MiB")

    from autoif.flows.instructions import build_instructions

    from autoif.store import Store

    t1 = time.perf_counter()
    refs = build_instructions(cfg)
    wall = time.perf_counter() - t1
    store = Store(cfg.store.root)
    print(f"flow wall time: {wall:.1f}s")
    for name, ref in refs.items():
        m = store.manifest(ref.run, ref.step, ref.key)
        f = m.meta["funnel"]
        print(f"  {name:20s} rows {m.rows:>7d}  parts {len(m.files):>3d}  in {f['rows_in']:>7d}  kept {f['rows_out']:>7d}  "
              f"dropped {sum(f['reasons'].values()):>6d}  {json.dumps(f['reasons'])[:80]}")
    parent, children = rss_mb()
    print(f"peak RSS: pipeline process {parent:.0f} MiB, largest child (sandbox worker / server) {children:.0f} MiB")
    json.dump({"instructions": n_total, "wall_s": wall, "peak_rss_mb": parent, "peak_child_rss_mb": children,
               "script_mb": script_mb}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
