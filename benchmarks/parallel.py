"""Parallel batches (issue 9, acceptance 6): one step, three ways, side by side in one run.

- cross_validation (sandbox bound): synthetic candidates, realistic functions and responses;
- verifier_synthesis (LLM bound): a real local llama.cpp ``llama-server`` with 2 parallel slots serving the
  embedded gemma3-270m model (``infra/build_llama_server.sh`` builds it once; ~10 min on 2 cores).

Each as (a) sequential batches (``runtime.max_batches_in_flight=1``, thread runner), (b) parallel batches on
the thread runner (``max_batches_in_flight=2``), (c) a local Dask cluster of 2 worker processes (2 in flight).
The step's own wall time is measured inside the flow (the Dask cluster's start-up is printed apart). The
engine sends one request at a time per batch (``engine.max_concurrency=1``), so parallelism across requests
comes from batches in flight; with ``max_concurrency=2`` one batch alone would fill both slots.

    .venv/bin/python benchmarks/parallel.py [--instructions 192] [--batch 24] [--synth-instructions 8]

Prints ``name = value`` lines, among them ``<step>.b/a`` and ``<step>.c/a`` (speedups over sequential).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sandbox_bench():
    spec = importlib.util.spec_from_file_location("sandbox_bench", ROOT / "benchmarks" / "sandbox.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def candidates_frame(n_instructions: int, funcs_per: int, seed: int = 0):
    """Verifier candidates as synthesis writes them: per instruction ``funcs_per`` realistic functions, each
    with 3 cases drawn from realistic responses (labels are what the first function says, so cases agree)."""
    import pandas as pd

    bench = _sandbox_bench()
    rng = random.Random(seed)
    funcs = bench.make_functions(max(200, n_instructions))
    responses = bench.make_responses(300, seed=seed)
    rows = []
    for i in range(n_instructions):
        picked = [funcs[(i + j * 7) % len(funcs)] for j in range(funcs_per)]
        for k, src in enumerate(picked):
            cases = [{"input": r, "output": bool(rng.random() < 0.5)} for r in rng.sample(responses, 3)]
            rows.append({"instruction_id": f"i{i:05d}", "instruction": f"synthetic instruction {i}", "family": "bench",
                         "completion": k, "func": src, "func_key": f"{i}-{k}", "cases": json.dumps(cases),
                         "n_cases": 3, "case_errors": "[]", "repairs": "[]", "raw": "", "reason": None})
    return pd.DataFrame(rows)


def start_llama_server(binary: str, model: str, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "--parallel", "2",
                             "-c", "4096", "-t", str(os.cpu_count() or 2), "--alias", "gemma3-270m"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited: {log.read_text()[-1500:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise TimeoutError("llama-server not healthy after 180 s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instructions", type=int, default=192, help="cross-validation: instructions")
    ap.add_argument("--funcs", type=int, default=6, help="cross-validation: functions per instruction")
    ap.add_argument("--batch", type=int, default=24, help="cross-validation: instructions per batch")
    ap.add_argument("--synth-instructions", type=int, default=8, help="verifier synthesis: instructions")
    ap.add_argument("--synth-batch", type=int, default=1, help="verifier synthesis: instructions per batch")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--port", type=int, default=8093)
    ap.add_argument("--skip-llm", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="autoif-parallel-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

    import pandas as pd
    from autoif.flows import steps
    from autoif.schemas.instructions import Instructions
    from autoif.schemas.verifiers import VerifierCandidates
    from prefect import flow

    from autoif.config import load_config
    from autoif.runtime import task_runner
    from autoif.runtime.recording import pipeline_run
    from autoif.store import Store

    base = {"store.root": str(work / "store"), "tracking.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
            "cross_validation.batch_size": args.batch, "verifier_synthesis.batch_size": args.synth_batch}
    store = Store(str(work / "store"))

    @flow(name="bench-one-step")
    def one_step(cfg, step_name: str, inputs: dict) -> dict:
        t0 = time.perf_counter()
        with pipeline_run(cfg, "bench") as run:
            t1 = time.perf_counter()
            ref = getattr(steps, step_name)(run, **inputs)
            t2 = time.perf_counter()
            usage = run.store.manifest(ref.run, ref.step, ref.key).meta.get("usage") or {}
        return {"step_s": t2 - t1, "setup_s": t1 - t0, "digest": ref.digest, "rows": ref.rows,
                "tokens": usage.get("llm_completion_tokens", 0.0)}

    variants = {"a": ("thread", 1), "b": ("thread", 2), "c": ("dask", 2)}

    def run_three(step_name: str, inputs: dict, overrides: dict) -> dict[str, dict]:
        out = {}
        for v, (runner, in_flight) in variants.items():
            cfg = load_config(overrides={**base, **overrides, "run_name": f"{step_name}-{v}",
                                         "runtime.task_runner": runner, "runtime.workers": 2,
                                         "runtime.max_batches_in_flight": in_flight})
            t0 = time.perf_counter()
            res = one_step.with_options(task_runner=task_runner(cfg.runtime))(cfg, step_name, inputs)
            res["flow_s"] = time.perf_counter() - t0
            out[v] = res
            print(f"{step_name}.{v}.runner = {runner} (batches in flight {in_flight})", flush=True)
            print(f"{step_name}.{v}.step_s = {res['step_s']:.2f}", flush=True)
            print(f"{step_name}.{v}.flow_s = {res['flow_s']:.2f}  # includes Prefect/Dask start-up", flush=True)
            if res["tokens"]:
                print(f"{step_name}.{v}.completion_tokens_per_s = {res['tokens'] / res['step_s']:.1f}", flush=True)
        a = out["a"]["step_s"]
        print(f"{step_name}.b/a = {a / out['b']['step_s']:.2f}  # wall-time speedup")
        print(f"{step_name}.c/a = {a / out['c']['step_s']:.2f}")
        if all(r["tokens"] for r in out.values()):  # sampled outputs differ in length: compare throughput too
            rate = {v: r["tokens"] / r["step_s"] for v, r in out.items()}
            print(f"{step_name}.tokens_per_s.b/a = {rate['b'] / rate['a']:.2f}")
            print(f"{step_name}.tokens_per_s.c/a = {rate['c'] / rate['a']:.2f}")
        print(f"{step_name}.same_digest = {len({r['digest'] for r in out.values()}) == 1}")
        return out

    # --- cross-validation (sandbox bound) --------------------------------------------------------------------
    cand = candidates_frame(args.instructions, args.funcs)
    m = store.write_step(cand, "prep", "verifier_synthesis", "bench", schema=VerifierCandidates,
                         meta={"funnel": {"step": "verifier_synthesis", "rows_in": len(cand), "rows_out": len(cand), "reasons": {}}})
    from autoif.runtime.execute import as_ref

    print(f"cross_validation.instructions = {args.instructions}")
    print(f"cross_validation.functions = {args.instructions * args.funcs}")
    print(f"cross_validation.batches = {-(-args.instructions // args.batch)}")
    run_three("cross_validate", {"candidates": as_ref(m)}, {})

    # --- verifier synthesis (LLM bound) ------------------------------------------------------------------
    if args.skip_llm:
        return
    binary = subprocess.run(["bash", str(ROOT / "infra" / "build_llama_server.sh")], capture_output=True, text=True,
                            check=True).stdout.strip().splitlines()[-1]
    from autoif.llm.llamacpp import default_gguf_path

    model = str(default_gguf_path())
    server = start_llama_server(binary, model, args.port, work / "llama-server.log")
    try:
        seeds = [json.loads(line)["instruction"] for line in (ROOT / "autoif" / "data" / "seeds.jsonl").read_text().splitlines()]
        inst = pd.DataFrame({"instruction_id": [f"s{i}" for i in range(args.synth_instructions)],
                             "instruction": seeds[: args.synth_instructions], "family": "seed", "source": "seed",
                             "duplicate_of": None, "reason": None})
        m = store.write_step(inst, "prep", "self_instruct", "bench", schema=Instructions,
                             meta={"funnel": {"step": "self_instruct", "rows_in": len(inst), "rows_out": len(inst), "reasons": {}}})
        llm = {"engine.kind": "openai", "engine.base_url": f"http://127.0.0.1:{args.port}/v1", "engine.model": "gemma3-270m",
               "engine.max_concurrency": 1, "verifier_synthesis.n_completions": 2,
               "verifier_synthesis.max_tokens": args.max_tokens}
        print(f"verifier_synthesis.instructions = {args.synth_instructions}")
        print(f"verifier_synthesis.batches = {-(-args.synth_instructions // args.synth_batch)}")
        print("verifier_synthesis.server = llama-server --parallel 2 (gemma3-270m Q4_K_M), engine.max_concurrency = 1")
        run_three("synthesize_verifiers", {"instructions": as_ref(m)}, llm)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
