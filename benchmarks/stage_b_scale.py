"""Stage B at scale (acceptance point 12 of issue 10): P (instruction, query) pairs x K responses through the real
flow (``build_data``: stage A, then every stage B step) with the scripted engine; prints wall time per step, peak
RSS of the pipeline process and of its children, and the verification step's sandbox throughput next to the raw
sandbox's on the same functions and responses, measured in the same run.

    python benchmarks/stage_b_scale.py [--pairs 10000] [--responses 4] [--queries-per-instruction 20]
                                       [--batch 4096] [--gen-batch 1024] [--workdir DIR]

Synthetic data: P / 20 instructions, each with 4 verification functions written from one template of
``benchmarks/sandbox.py`` (IFEval-style checks as LLMs write them) at 4 neighbouring parameters (word-count
thresholds 20/50/80/120, keyword counts, sentence limits ...), so the functions agree on clear cases and split on
borderline responses. Stage A is scripted so that every instruction survives it with its 4 functions: 4
completions each with one function and 3 test cases on which all 4 functions agree (cases chosen by running the
functions), back-translations and "entailment" judgements. Each instruction is paired with 20 of 400 synthetic
user queries; each pair's K responses are drawn from ``benchmarks/sandbox.py``'s response generator, half at
random and half by pass-rate bucket, so verification sees a spread of pass rates (0, 0.25, ... 1). Every
response gets a canned score (mostly 9-10 as JSON, some "Score: N" lines, some low, out of range or missing).

The raw sandbox figure: after the flow, the verification step's exact calls (the same functions on the same
responses, cut into the same batches) go to ``Sandbox().run`` directly, one batch after the other; and, for
reference, ``benchmarks/sandbox.py``'s dense measurement (200 of these functions x 500 of these responses).
``verification_throughput/raw_sandbox`` compares wall times (goal >= 0.8); ``..._cpu`` compares CPU seconds
(flow process + sandbox workers), which moves less when other work shares the machine.
Output: ``name = value`` lines (and the same figures as one JSON line at the end).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import os
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sandbox as sandbox_bench  # benchmarks/sandbox.py: its functions, responses and measurement

QUERIES_IN_POOL = 400
N_SEEDS = 4
FUNCS_PER_INSTRUCTION = 4
CASES_PER_LABEL = 6  # x 2 labels = 12 cases = 4 completions x 3 (cross-validation needs >= 10)
DESCRIPTIONS = [  # one per template of benchmarks/sandbox.py, in its order
    "Write your whole answer in lowercase letters", "Use at least the given number of words",
    "Use fewer than the given number of words", "Use the given keyword several times",
    "Answer with an exact number of bullet points", "Answer in an exact number of paragraphs",
    "End your answer with the given phrase", "Start your answer with the given word", "Do not use any commas",
    "Answer in valid JSON", "Give your answer a title in double angular brackets",
    "Use at most the given number of sentences", "Control how many words are in capital letters",
    "Include placeholders in square brackets", "Highlight parts with asterisks", "Use the given letter often",
    "Write in Latin script", "End with a postscript starting with P.S.", "Divide the answer into SECTION parts",
    "Avoid the forbidden words", "Do not repeat any word too often", "Keep punctuation sparse",
    "Use enough long words", "Start with a line in title case", "Do not use any digits",
]
EXTRA_CASES = [  # clear-cut inputs, so every template finds cases all its functions agree on
    "hello world", "HELLO WORLD", "Hello, World!", "yes", "Thanks.", "End.", "Let me know.", "12345 67890",
    " ".join(["word"] * 400), " ".join(["data model time"] * 60), "data data data model model model time time",
    "- one\n- two", "- one\n- two\n- three", "* a\n* b\n* c\n* d", "- a\n- b\n- c\n- d\n- e", "* 1\n* 2\n* 3\n* 4\n* 5\n* 6",
    "one\n\ntwo", "one\n\ntwo\n\nthree", "a\n\nb\n\nc\n\nd", "a\n\nb\n\nc\n\nd\n\ne", '{"a": 1}', '```json\n{"a": [1, 2]}\n```',
    "<<A Title>>\nbody text", "P.S. see you", "text\nP.S. later", "SECTION 1\nx\nSECTION 2\ny",
    "SECTION 1\na\nSECTION 2\nb\nSECTION 3\nc", "SECTION 1\na\nSECTION 2\nb\nSECTION 3\nc\nSECTION 4\nd",
    "Καλημέρα κόσμε, τι κάνεις σήμερα", "Привет мир как дела", "[a] [b] [c] [d]", "*a* *b* *c* *d* *e*",
    "zzz qqq xxx kkk zzzzzzzzzz qqqqqqqqqq xxxxxxxxxx kkkkkkkkkk", "A.B.C.D.E.F.G!!!,,,???;;;", "THE BIG RED DOG RUNS FAST NOW",
    "Sure, here it is. " * 40, "Here is the answer.", "The answer is short.", "In short, no.",
    "internationalization responsibilities organizational developmentally " * 3,
    "Title Case Line\nrest of it", "very really however clearly obviously i think data model",
] + [" ".join(f"sentence number {k}." for k in range(n)) for n in (2, 4, 6, 9, 12, 18, 25, 40)]
SCORE_OUTPUTS = ([('{{"analysis": "answers the query", "score": {}}}', 10)] * 5 + [('{{"analysis": "helpful", "score": {}}}', 9)] * 3
                 + [("The response addresses the query.\nScore: {}", 10)] * 2 + [('{{"analysis": "off topic", "score": {}}}', 6)]
                 + [('{{"analysis": "odd", "score": {}}}', 12)] + [("I cannot judge this.", None)])


# --- the synthetic data ----------------------------------------------------------------------------------


def design(i: int, same: bool = False) -> tuple[int, list[dict]]:
    """Instruction i's template and the parameters of its 4 functions: neighbours in the template's list, or
    (``same``: for exact counts, where neighbours never agree on a passing case) one parameter 4 times."""
    t = i % len(sandbox_bench._TEMPLATES)
    params = sandbox_bench._TEMPLATES[t][1]
    w = i // len(sandbox_bench._TEMPLATES)
    return t, [params[(w + (0 if same else j)) % len(params)] for j in range(FUNCS_PER_INSTRUCTION)]


def func_source(i: int, j: int, same: bool = False) -> str:
    """Function j of instruction i: the template at its parameter, with a docstring that makes the source (and
    its AST, which stage A deduplicates on) distinct per instruction and function."""
    t, params = design(i, same)
    src = sandbox_bench._TEMPLATES[t][0].format(**params[j])
    return src.replace("def evaluate(response):\n", f'def evaluate(response):\n    """Check {j + 1} of instruction {i}."""\n',
                       1).strip()


def verdicts(srcs: list[str], inputs: list[str]) -> list[list[bool | None]]:
    """In-process verdicts (normalised as the sandbox does), to choose cases and responses by pass rate."""
    out = []
    for src in srcs:
        _, values = sandbox_bench.bench_inprocess([src], inputs)
        out.append(values)
    return out


def words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 9))) for _ in range(n)]


def make_queries(rng: random.Random, n: int) -> list[str]:
    verbs = ["keep", "plan", "fix", "clean", "store", "cook", "learn", "explain", "choose", "compare", "repair", "organise",
             "start", "improve", "measure"]
    nouns = ["basil plants", "a small garden", "my budget", "a bike chain", "sourdough bread", "a job interview",
             "chess openings", "a mortgage rate", "winter tyres", "a home network", "a study schedule", "a wooden table",
             "a team meeting", "running shoes", "a kitchen drawer", "a cover letter", "tomato seedlings", "a slow laptop",
             "a birthday party"]
    tails = ["without spending much", "before the weekend", "when I have little time", "as a beginner", "on a rainy day",
             "for a family of four", "in a small flat", "if I travel a lot", "step by step", "without special tools"]
    out: set[str] = set()
    while len(out) < n:
        q = f"How can I {rng.choice(verbs)} {rng.choice(nouns)} {rng.choice(tails)}?"
        if rng.random() < 0.3:
            q += f" I tried {rng.choice(nouns)} last time and it did not work."
        out.add(q)
    return sorted(out)


def build_inputs(cfg, n_inst: int, k: int, work: Path) -> dict:
    """Seed file, query file and the scripted engine's file for n_inst instructions x 20 queries x k responses."""
    import pandas as pd
    from autoif.tasks.back_translation import back_translation_prompt
    from autoif.tasks.consistency_filter import JUDGE_PROMPT
    from autoif.tasks.quality_filter import score_prompt
    from autoif.tasks.queries import load_queries
    from autoif.tasks.query_augmentation import pair_queries, response_prompt
    from autoif.tasks.seeds import read_seeds
    from autoif.tasks.self_instruct import SELF_INSTRUCT_PROMPT
    from autoif.tasks.verifier_synthesis import verifier_prompt

    rng = random.Random(0)
    vocab = words(rng, 3000)
    texts = [f"{DESCRIPTIONS[design(i)[0]]} (task {i}: write about {a}, {b} and {c})."
             for i, (a, b, c) in enumerate(rng.sample(vocab, 3) for _ in range(n_inst))]
    seeds_file = work / "seeds.jsonl"
    seeds_file.write_text("".join(json.dumps({"family": f"template{design(i)[0]}", "instruction": texts[i]}) + "\n"
                                  for i in range(min(N_SEEDS, n_inst))))
    queries_file = work / "queries.jsonl"
    queries_file.write_text("".join(json.dumps({"query": q, "category": "howto"}) + "\n"
                                    for q in make_queries(rng, QUERIES_IN_POOL)))

    pool = sandbox_bench.make_responses(1500, seed=5)
    probes = [json.loads(line)["response"] for line in (Path(__file__).resolve().parent.parent / "autoif" / "data"
                                                        / "probes.jsonl").read_text().splitlines() if line.strip()]
    candidates = list(dict.fromkeys([c for c in EXTRA_CASES + probes + pool[:300] if c.strip()]))
    by_design: dict[tuple, dict] = {}  # template + parameters -> cases and response buckets (same for all its instructions)
    funcs_of: list[list[str]] = []
    plan = []
    for i in range(n_inst):
        t, params = design(i)
        key = (t, json.dumps(params, sort_keys=True))
        if key not in by_design:
            for same in (False, True):
                srcs = [func_source(i, j, same) for j in range(FUNCS_PER_INSTRUCTION)]
                on_cases = verdicts(srcs, candidates)
                yes = [c for n, c in enumerate(candidates) if all(v[n] is True for v in on_cases)]
                no = [c for n, c in enumerate(candidates) if all(v[n] is False for v in on_cases)]
                if yes and no and len(yes) + len(no) >= 2 * CASES_PER_LABEL:
                    break
            else:
                raise SystemExit(f"template {t} {params}: only {len(yes)} agreed True and {len(no)} agreed False cases")
            n_yes = min(len(yes), max(CASES_PER_LABEL, 2 * CASES_PER_LABEL - len(no)))
            cases = [{"input": c, "output": True} for c in rng.sample(yes, n_yes)] + \
                    [{"input": c, "output": False} for c in rng.sample(no, 2 * CASES_PER_LABEL - n_yes)]
            on_pool = verdicts(srcs, pool)
            rates = [sum(v[n] is True for v in on_pool) / len(srcs) for n in range(len(pool))]
            buckets: dict[float, list[int]] = {}
            for n, r in enumerate(rates):
                buckets.setdefault(r, []).append(n)
            by_design[key] = {"cases": cases, "buckets": list(buckets.values()), "same": same}
        plan.append(by_design[key])
        funcs_of.append([func_source(i, j, by_design[key]["same"]) for j in range(FUNCS_PER_INSTRUCTION)])

    def rec(prompt: str, outputs: list[str]) -> str:
        return json.dumps({"prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(), "outputs": outputs}) + "\n"

    # which queries each instruction gets: the flow's own pairing function on the flow's own query rows
    from autoif.tasks.ids import instruction_id

    query_rows = load_queries(cfg.queries)
    query_rows = query_rows[query_rows["reason"].isna()]
    inst_frame = pd.DataFrame({"instruction_id": [instruction_id(t) for t in texts], "instruction": texts,
                               "family": "x", "funcs": "[]", "func_ids": "[]", "verifier_source": "synthesized"})
    pairs = pair_queries(inst_frame, query_rows, cfg.query_augmentation, cfg.seed)
    script = work / "script.jsonl"
    n_scores = 0
    with script.open("w") as f:
        seeds = read_seeds(seeds_file)
        new = texts[N_SEEDS:]
        calls = ["\n".join(f"- {t}" for t in new[j : j + 50]) for j in range(0, len(new), 50)] or ["no new instructions"]
        f.write(rec(SELF_INSTRUCT_PROMPT.format(seeds="\n".join(f"- {s}" for s in seeds["instruction"])), calls))
        for i, t in enumerate(texts):
            cases = plan[i]["cases"]
            # backticks as \u0060 inside the JSON: the flow's fence finder stops at a ``` inside a string
            outs = ["```json\n" + json.dumps({"func": funcs_of[i][j], "cases": cases[3 * j : 3 * j + 3]}).replace("`", "\\u0060")
                    + "\n```" for j in range(FUNCS_PER_INSTRUCTION)]
            f.write(rec(verifier_prompt(t, cfg.verifier_synthesis), outs))
            bts = [f"{DESCRIPTIONS[design(i)[0]]}, check {j + 1}." for j in range(cfg.back_translation.max_funcs)]
            f.write(rec(back_translation_prompt(funcs_of[i][: cfg.back_translation.max_funcs]), [json.dumps({"instructions": bts})]))
            for h in bts:
                f.write(rec(JUDGE_PROMPT.format(premise=t, hypothesis=h), ['{"label": "entailment"}']))
        index = {t: i for i, t in enumerate(texts)}
        for p in pairs.itertuples():
            buckets = plan[index[p.instruction]]["buckets"]
            picks = [rng.randrange(len(pool)) if rng.random() < 0.5 else rng.choice(rng.choice(buckets)) for _ in range(k)]
            outs = [pool[n] for n in picks]
            f.write(rec(response_prompt(p.instruction, p.query), outs))
            for r in dict.fromkeys(outs):
                fmt, score = rng.choice(SCORE_OUTPUTS)
                f.write(rec(score_prompt(p.instruction, p.query, r), [fmt.format(score)]))
                n_scores += 1
    return {"instructions": n_inst, "pairs": len(pairs), "designs": len(by_design), "score_records": n_scores,
            "script_mb": script.stat().st_size / 2**20, "funcs": [s for fs in funcs_of for s in fs], "pool": pool}


# --- measuring -------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as fh:
                out += [int(c) for c in fh.read().split()]
        except OSError:
            continue
    return out


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _kind(pid: int, parent: str | None) -> str:
    """What a descendant is: the sandbox (bwrap and everything under it), the Prefect server, or other."""
    if parent == "sandbox":
        return "sandbox"
    cmd = _cmdline(pid)
    if not cmd:
        return "gone"
    if "bwrap" in cmd or "autoif.sandbox" in cmd:
        return "sandbox"
    if "prefect" in cmd or "uvicorn" in cmd:
        return "prefect_server"
    return parent or "other"


class ChildMonitor(threading.Thread):
    """Polls this process's descendants: the largest peak RSS (VmHWM) of one process and the largest total RSS
    at one moment, per kind (sandbox, prefect_server, other)."""

    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval, self.stop = interval, threading.Event()
        self.peak_each: dict[str, int] = {}  # kB
        self.peak_total: dict[str, int] = {}  # kB
        self.kinds: dict[int, str] = {}
        self.other: set[str] = set()  # command lines of the "other" descendants

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            total: dict[str, int] = {}
            todo = [(c, None) for c in _children(os.getpid())]
            while todo:
                pid, parent = todo.pop()
                if pid not in self.kinds:
                    self.kinds[pid] = kind = _kind(pid, parent)
                    if kind == "other":
                        self.other.add(_cmdline(pid)[:120])
                kind = self.kinds[pid]
                total[kind] = total.get(kind, 0) + _status_kb(pid, "VmRSS")
                self.peak_each[kind] = max(self.peak_each.get(kind, 0), _status_kb(pid, "VmHWM"))
                todo += [(c, kind) for c in _children(pid)]
            for kind, v in total.items():
                self.peak_total[kind] = max(self.peak_total.get(kind, 0), v)


def cpu_seconds() -> float:
    """CPU seconds used so far by this process (all its threads) plus its sandbox workers and the job children
    they reaped (as ``benchmarks/sandbox.py`` counts them): what the verification work costs, whatever else
    the machine runs at the same time."""
    tck = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    todo = [(c, None) for c in _children(os.getpid())]
    while todo:
        pid, parent = todo.pop()
        kind = _kind(pid, parent)
        if kind == "sandbox":
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    total += sum(int(x) for x in fh.read().rsplit(")", 1)[1].split()[11:15]) / tck
            except OSError:
                pass
        todo += [(c, kind) for c in _children(pid)]
    return total


def _reset_hwm() -> bool:
    """Reset this process's peak RSS (VmHWM), so a later read is the peak since now (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class StepClock(logging.Handler):
    """Wall time and peak RSS of the flow process for each step, from the step runtime's ``step_start`` /
    ``step_done`` progress events (steps run one after the other; a step's batches run in this process)."""

    def __init__(self, track_rss: bool) -> None:
        super().__init__(logging.INFO)
        self.track_rss = track_rss
        self.start: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # CPU seconds (process + sandbox) of the steps named in cpu_steps
        self.cpu_steps = {"verification"}
        self.overall_kb = 0

    def hwm(self) -> int:
        kb = _status_kb(os.getpid(), "VmHWM")
        self.overall_kb = max(self.overall_kb, kb)
        return kb

    def emit(self, record: logging.LogRecord) -> None:
        p = getattr(record, "progress", None) or {}
        if p.get("event") == "step_start":
            if self.track_rss:
                self.hwm()
                _reset_hwm()
            if p["step"] in self.cpu_steps:
                self.cpu[p["step"]] = -cpu_seconds()
            self.start[p["step"]] = time.perf_counter()
        elif p.get("event") == "step_done" and p.get("step") in self.start:
            self.wall[p["step"]] = time.perf_counter() - self.start[p["step"]]
            if p["step"] in self.cpu:
                self.cpu[p["step"]] += cpu_seconds()
            if self.track_rss:
                self.peak_mb[p["step"]] = self.hwm() / 1024


def raw_sandbox_same_calls(store, ref, batch_size: int) -> tuple[int, float, float]:
    """The verification step's calls (its responses, its functions, its pairs, its batches) straight to
    ``Sandbox().run``, one batch after the other; returns (calls, seconds inside run, CPU seconds inside run)."""
    from autoif.tasks.batching import row_batches

    from autoif.sandbox import Sandbox

    calls, seconds, cpu = 0, 0.0, 0.0
    frames = (f[["response", "funcs", "func_ids"]] for f in store.iter_step(ref))
    with Sandbox() as sb:
        sb.run(["def evaluate(response):\n    return True"], ["warm-up"])
        for batch in row_batches(frames, batch_size):
            funcs: dict[str, int] = {}
            srcs: list[str] = []
            pairs: list[tuple[int, int]] = []
            for i, (ids, fs) in enumerate(zip(batch["func_ids"], batch["funcs"])):
                for fid, src in zip(json.loads(ids), json.loads(fs)):
                    if fid not in funcs:
                        funcs[fid] = len(srcs)
                        srcs.append(src)
                    pairs.append((funcs[fid], i))
            inputs = batch["response"].tolist()
            c0, t0 = cpu_seconds(), time.perf_counter()
            res = sb.run(srcs, inputs, pairs)
            seconds += time.perf_counter() - t0
            cpu += cpu_seconds() - c0
            calls += len(res)
    return calls, seconds, cpu


def raw_sandbox_dense(funcs: list[str], responses: list[str], repeat: int = 2) -> float:
    """``benchmarks/sandbox.py``'s (b): ``Sandbox()`` on a full functions x responses matrix, best of ``repeat``."""
    from autoif.sandbox import Sandbox

    best = 0.0
    with Sandbox() as sb:
        sb.run(funcs[:4], responses[:50])
        for _ in range(repeat):
            t0 = time.perf_counter()
            sb.run(funcs, responses)
            best = max(best, len(funcs) * len(responses) / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=10_000, help="(instruction, query) pairs")
    ap.add_argument("--responses", type=int, default=4, help="responses per pair")
    ap.add_argument("--queries-per-instruction", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4096, help="responses per verification / quality-filter batch")
    ap.add_argument("--gen-batch", type=int, default=1024, help="pairs per response-generation batch")
    ap.add_argument("--in-flight", type=int, default=2, help="runtime.max_batches_in_flight")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="autoif-stage-b-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    os.environ.setdefault("DO_NOT_TRACK", "true")

    from autoif.config import load_config

    qpi = min(args.queries_per_instruction, args.pairs)
    n_inst = math.ceil(args.pairs / qpi)
    overrides = {
        "run_name": "stage-b-scale", "store.root": str(work / "store"), "tracking.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "engine.kind": "scripted", "engine.scripted_path": str(work / "script.jsonl"),
        "self_instruct.seeds_path": str(work / "seeds.jsonl"), "self_instruct.n_calls": max(1, math.ceil((n_inst - N_SEEDS) / 50)),
        "verifier_synthesis.n_completions": FUNCS_PER_INSTRUCTION, "consistency_filter.mode": "llm_judge",
        "queries.path": str(work / "queries.jsonl"), "query_augmentation.queries_per_instruction": qpi,
        "response_generation.n_responses": args.responses, "response_generation.batch_size": args.gen_batch,
        "verification.batch_size": args.batch, "quality_filter.batch_size": args.batch,
        "runtime.max_batches_in_flight": args.in_flight,
    }
    cfg = load_config(preset="code", overrides=overrides)
    t0 = time.perf_counter()
    built = build_inputs(cfg, n_inst, args.responses, work)
    t_build = time.perf_counter() - t0
    funcs, pool = built.pop("funcs"), built.pop("pool")
    gc.collect()
    rss_before = _status_kb(os.getpid(), "VmRSS") / 1024
    hwm_reset = _reset_hwm()  # this process's peak from here on is the flow's, not the script building's

    from autoif.flows.data import build_data

    from autoif.sandbox import close_shared_sandbox
    from autoif.store import Store

    clock = StepClock(track_rss=hwm_reset)
    progress = logging.getLogger("autoif.progress")
    progress.addHandler(clock)
    progress.setLevel(logging.INFO)
    progress.propagate = False  # timed here, not printed
    monitor = ChildMonitor()
    monitor.start()
    t1 = time.perf_counter()
    refs = build_data(cfg)
    wall = time.perf_counter() - t1
    monitor.stop.set()
    monitor.join()
    peak_self = (max(clock.hwm(), clock.overall_kb) if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
    close_shared_sandbox()  # the flow's pool: gone before the raw measurement starts its own
    store = Store(cfg.store.root)

    fig: dict[str, float | int | str] = {"pairs": args.pairs, "responses_per_pair": args.responses,
                                         "instructions": built["instructions"], "cpus": os.cpu_count() or 1}
    fig.update({f"script_{k}": v for k, v in built.items() if k != "instructions"})
    fig["script_build_s"] = t_build
    fig["flow_wall_s"] = wall
    names = list(refs)
    stage_b = names[names.index("stage_b_instructions"):]  # the flow's order: stage A's steps, then stage B's
    for name, ref in refs.items():
        m = store.manifest(ref.run, ref.step, ref.key)
        f = m.meta["funnel"]
        fig[f"step.{name}.wall_s"] = round(clock.wall.get(name, float("nan")), 2)
        fig[f"step.{name}.rows_in"] = f["rows_in"]
        fig[f"step.{name}.kept"] = f["rows_out"]
        if name in clock.peak_mb:
            fig[f"step.{name}.peak_rss_mb"] = round(clock.peak_mb[name], 1)
        if "batches" in m.meta:
            fig[f"step.{name}.batches"] = m.meta["batches"]
            fig[f"step.{name}.busy_s"] = m.meta["seconds"]  # sum over batches (in flight at once: > wall)
        if f["reasons"]:
            fig[f"step.{name}.dropped"] = json.dumps(f["reasons"], sort_keys=True)
    fig["stage_b_wall_s"] = round(sum(clock.wall.get(s, 0.0) for s in stage_b), 2)

    vref = refs["verification"]
    vm = store.manifest(vref.run, vref.step, vref.key)
    calls, vwall = vm.meta["sandbox_calls"], clock.wall["verification"]
    rates = store.read_columns(vref, ["pass_rate"])["pass_rate"].round(2).value_counts().sort_index()
    fig["verification_pass_rates"] = json.dumps({f"{k:g}": int(v) for k, v in rates.items()})
    fig["verification_sandbox_calls"] = calls
    fig["verification_calls_per_s"] = calls / vwall
    fig["verification_calls_per_busy_s"] = calls / vm.meta["seconds"] if vm.meta["seconds"] else float("nan")
    fig["loadavg_1m_after_flow"] = round(os.getloadavg()[0], 2)
    raw_calls, raw_s, raw_cpu = raw_sandbox_same_calls(store, refs["response_generation"], args.batch)
    fig["raw_sandbox_calls"] = raw_calls
    fig["raw_sandbox_calls_per_s"] = raw_calls / raw_s
    fig["verification_throughput/raw_sandbox"] = fig["verification_calls_per_s"] / fig["raw_sandbox_calls_per_s"]
    # the same comparison in CPU time (flow process + sandbox workers), which other load on the machine moves less
    fig["verification_cpu_us_per_call"] = clock.cpu["verification"] / calls * 1e6
    fig["raw_sandbox_cpu_us_per_call"] = raw_cpu / raw_calls * 1e6
    fig["verification_throughput/raw_sandbox_cpu"] = fig["raw_sandbox_cpu_us_per_call"] / fig["verification_cpu_us_per_call"]
    rng = random.Random(1)
    dense = raw_sandbox_dense(rng.sample(funcs, min(200, len(funcs))), pool[:500])
    fig["raw_sandbox_dense_200x500_evals_per_s"] = dense
    fig["verification_throughput/raw_sandbox_dense"] = fig["verification_calls_per_s"] / dense

    fig["rss_before_flow_mb"] = round(rss_before, 1)
    fig["peak_rss_pipeline_mb"] = round(peak_self, 1)
    for kind in sorted(monitor.peak_each):
        fig[f"peak_rss_child.{kind}.largest_mb"] = round(monitor.peak_each[kind] / 1024, 1)
        fig[f"peak_rss_child.{kind}.total_mb"] = round(monitor.peak_total.get(kind, 0) / 1024, 1)
    if monitor.other:
        fig["children_other"] = json.dumps(sorted(monitor.other))
    fig["loadavg_1m_end"] = round(os.getloadavg()[0], 2)

    for k, v in fig.items():
        print(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}")
    json.dump(fig, sys.stdout, default=str)
    print()


if __name__ == "__main__":
    main()
