"""Stage C on a toy verifiable constraint, side by side in one run (the online curve, and what our SFT step costs).

1. Pass-rate curve: a handful of prompts such as ``Describe the ocean.\\nAnswer in lowercase letters only.``
   with one verifier, ``response == response.lower()`` plus at least three words (an empty or one-word reply
   must not pass: no reward hacking by saying nothing). The real online flow
   (:func:`autoif.flows.online.online_iterations`: policy samples K per prompt at T=0.8 -> stage B's
   verification in the sandbox -> contamination check -> pairs, chosen pass rate > 0.5, rejected == 0 -> one
   DPO round from the previous model) runs ``--iterations`` rounds from the base policy (an empty
   ``TrainedModels`` input: a fresh LoRA in round 1), the quality gate off (no judge engine); the last model is
   sampled and verified once more by the next iteration's samples and verification steps (nothing trained).
   Prints ``pass_rate.iterN`` (iter0 = the base policy, iterN = after N DPO rounds; passing samples over all
   K x prompts samples, an empty reply fails) and ``pairs.iterN`` (the pairs round N trained on, made from
   iter(N-1)'s samples). The pass rate is a sample of P x K draws at T=0.8: with the default sizes one
   iteration's value moves by about +-0.1 from sampling alone.
2. Overhead of our SFT step: the same TRL SFT export (``--sft-rows`` conversations), the same SFTConfig and
   LoRA values, the base loaded the same way (:func:`autoif.policy.load_base`), (a) a bare TRL script
   (``datasets.Dataset`` + ``trl.SFTTrainer`` + ``trainer.save_model``, ``report_to="none"``) and (b) the real
   stage C step ``autoif.flows.steps.train_sft`` inside a Prefect flow with
   :func:`autoif.runtime.recording.pipeline_run` (store read, its own MLflow training run with TRL's MLflow
   callback, the packed adapter row, the logged model, manifest, artifacts). Run ``--repeat`` times each,
   alternating which goes first, the bare script in a worker thread as the flow's thread runner runs its task
   (and once more in the main thread: ``sft_bare_main_s``); medians. Goal: ``sft_flow/bare <= 1.1``.
   ``same_loss`` checks both trained the same thing (equal final train_loss). Wall times on a shared machine
   are noisy (the same train() took 29-121 s in one run here): ``sft_flow/bare.same_train`` puts each side's
   median time outside TRL's ``train_runtime`` around one common train time. It leaves out what runs inside
   train() on our side only (TRL's MLflow callback logging each step), so read it with ``sft_flow/bare``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/online_toy.py [--tiny] [--iterations 2] [--prompts 6]
        [--samples 4] [--max-new-tokens 32] [--steps 8] [--dpo-lr 2e-4] [--sft-rows 32] [--sft-steps 8]
        [--repeat 2] [--device auto|cpu|cuda] [--skip-online] [--skip-sft] [--workdir DIR]

``--tiny``: the random tiny Qwen2 of ``tests/tiny_models.py`` instead of the embedded gemma3-270m (a smoke
run of the machinery in a minute; its pass rates mean nothing). The embedded model is converted from its
GGUF once into ``$AUTOIF_CACHE/models`` (about 45 s the first time). Nothing is downloaded
(``HF_HUB_OFFLINE=1``). Ephemeral Prefect (started before anything is timed), a local store and SQLite MLflow
in a temp dir. Prints ``name = value`` lines, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS: dict[str, object] = {}

INSTRUCTION = "Answer in lowercase letters only."
# the toy verifier: lowercase, and not trivially so (an empty or one- or two-word reply fails)
VERIFIER = ("def evaluate(response):\n"
            "    return response == response.lower() and len(response.split()) >= 3")
TOPICS = ["the ocean", "a mountain", "a forest at dawn", "the city at night", "a thunderstorm", "an old library",
          "a desert", "a winter morning", "a busy market", "a quiet lake", "a train journey", "a garden in spring"]


def say(name: str, value, note: str = "") -> None:
    RESULTS[name] = value
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    print(f"{name} = {text}" + (f"  # {note}" if note else ""), flush=True)


# --- inputs as stage B would have stored them ---------------------------------------------------------------


def toy_pairs(n: int):
    """n QueryPairs rows of the one toy instruction; the sampling prompt is the prompt DPO trains on
    (``training_prompt(query, instruction)``), so the samples are on-policy for the pairs they make."""
    import pandas as pd
    from autoif.tasks.training_data import training_prompt

    rows = []
    for i in range(n):
        query = f"Describe {TOPICS[i % len(TOPICS)]}." + ("" if i < len(TOPICS) else f" (take {i // len(TOPICS) + 1})")
        rows.append({"pair_id": f"p{i:04d}", "instruction_id": "i-lower", "instruction": INSTRUCTION, "family": "case",
                     "funcs": json.dumps([VERIFIER]), "func_ids": json.dumps(["f-lower"]), "verifier_source": "synthesized",
                     "query_id": f"q{i:04d}", "query": query, "prompt": training_prompt(query, INSTRUCTION), "reason": None})
    return pd.DataFrame(rows)


def sft_export(n: int):
    """n rows of the TRL SFT export: the toy prompts answered in lowercase."""
    import pandas as pd

    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        answer = (f"{topic} is calm and wide, with soft light and a slow rhythm. people come to {topic} to rest, "
                  f"to think and to watch the world change a little every hour (note {i}).")
        rows.append({"messages": [{"role": "user", "content": f"Describe {topic}.\n{INSTRUCTION}"},
                                  {"role": "assistant", "content": answer}],
                     "sft_id": f"s{i:05d}", "instruction_id": "i-lower", "query_id": f"q{i:05d}", "pass_rate": 1.0,
                     "score": 9.0, "func_ids": json.dumps(["f-lower"]), "verifier_source": "synthesized"})
    return pd.DataFrame(rows)


def stored(store, frame, step: str, schema, run: str = "prep"):
    from autoif.runtime.execute import as_ref

    kept = int(frame["reason"].isna().sum()) if "reason" in frame else len(frame)
    m = store.write_step(frame, run, step, "bench", schema=schema,
                         meta={"funnel": {"step": step, "rows_in": len(frame), "rows_out": kept, "reasons": {}}})
    return as_ref(m)


def empty_models():
    """An empty TrainedModels frame: the base policy as the init model."""
    from autoif.tasks.batching import empty_frame
    from autoif.tasks.training import COLUMNS

    frame = empty_frame(COLUMNS, ints=("iteration", "train_rows", "steps"))
    return frame.astype({"is_adapter": bool, "train_loss": float, "reward_margin": float, "seconds": float})


# --- 1. the online pass-rate curve --------------------------------------------------------------------------


def make_online_flow():
    import dataclasses

    from autoif.flows.online import iteration_steps, online_config, online_iterations
    from prefect import flow

    from autoif.runtime.recording import pipeline_run

    @flow(name="bench-online-toy")
    def online_toy(cfg, prompts, init) -> dict:
        with pipeline_run(cfg, "bench") as run:
            t0 = time.perf_counter()
            refs = online_iterations(run, prompts=prompts, init=init)
            rounds_s = time.perf_counter() - t0
            n = cfg.online.iterations
            trained = [refs[f"online{i}_train"] for i in range(n, 0, -1) if f"online{i}_train" in refs]
            last = trained[0] if trained else init
            # the last model's samples: the next iteration's sampling and verification steps, no training
            ocfg = online_config(cfg)
            s = iteration_steps(ocfg, n + 1)
            orun = dataclasses.replace(run, cfg=ocfg)
            refs[s["samples"].name] = s["samples"](orun, prompts=prompts, init=last)
            refs[s["verification"].name] = s["verification"](orun, responses=refs[s["samples"].name])
        return {"refs": refs, "rounds_s": rounds_s}

    return online_toy


def bench_online(args, work: Path, base: dict) -> None:
    from autoif.schemas.stage_b import QueryPairs
    from autoif.schemas.training import TrainedModels

    from autoif.config import load_config
    from autoif.store import Store

    store = Store(str(work / "store"))
    prompts = stored(store, toy_pairs(args.prompts), "query_augmentation", QueryPairs)
    init = stored(store, empty_models(), "init_base", TrainedModels)
    overrides = {**base, "run_name": "online-toy", "online.iterations": args.iterations,
                 "online.samples_per_prompt": args.samples, "online.max_new_tokens": args.max_new_tokens,
                 "online.temperature": 0.8, "online.max_prompts": args.prompts, "online.quality_gate": False,
                 "online.dpo": {"max_steps": args.steps, "learning_rate": args.dpo_lr},
                 "train.dpo": {"per_device_train_batch_size": 4, "max_length": 256}}
    cfg = load_config(overrides=overrides)
    cfg.online.check()
    say("online.setup", f"{args.prompts} prompts x {args.samples} samples at T=0.8, max_new_tokens {args.max_new_tokens}; "
        f"DPO {args.steps} steps per round, lr {args.dpo_lr}, batch 4; verifier: lowercase and >= 3 words")
    t0 = time.perf_counter()
    from autoif.runtime import task_runner

    res = make_online_flow().with_options(task_runner=task_runner(cfg.runtime))(cfg, prompts, init)
    total = time.perf_counter() - t0
    refs = res["refs"]
    example = None
    for i in range(1, args.iterations + 2):
        samples, _ = store.read_step(refs[f"online{i}_samples"])
        verified, _ = store.read_step(refs[f"online{i}_verification"])
        n_pass = int((verified["pass_rate"] >= 1.0).sum())
        say(f"pass_rate.iter{i - 1}", n_pass / max(len(samples), 1),
            f"{n_pass}/{len(samples)} samples pass" + (" (base policy)" if i == 1 else f" (after {i - 1} DPO rounds)"))
        say(f"verified_mean.iter{i - 1}", float(verified["pass_rate"].mean()) if len(verified) else float("nan"),
            f"the flow's online.pass_rate: mean over the {len(verified)} non-empty samples")
        if i == 1 and len(samples):
            example = str(samples["response"].fillna("").iloc[0])[:120]
        if i <= args.iterations:
            pairs, _ = store.read_step(refs[f"online{i}_pairs"])
            say(f"pairs.iter{i}", int(pairs["reason"].isna().sum()), f"made from iter{i - 1}'s samples, trained round {i}")
            if f"online{i}_train" in refs:
                row, _ = store.read_step(refs[f"online{i}_train"])
                r = row.iloc[0]
                say(f"dpo.iter{i}.train_loss", float(r["train_loss"]) if r["train_loss"] == r["train_loss"] else float("nan"))
                say(f"dpo.iter{i}.reward_margin", float(r["reward_margin"]) if r["reward_margin"] == r["reward_margin"] else float("nan"))
                say(f"dpo.iter{i}.seconds", float(r["seconds"]))
            else:
                say(f"dpo.iter{i}.trained", False, "no pairs: the model carried over untrained")
    say("online.example_iter0", json.dumps(example))
    say("online.rounds_s", float(res["rounds_s"]), f"{args.iterations} iterations through the flow")
    say("online.total_s", total, "the flow call, with the last model's extra sampling and verification")


# --- 2. SFT: our step vs a bare TRL script ------------------------------------------------------------------


def sft_values(args, steps: int) -> dict:
    return {"max_steps": steps, "per_device_train_batch_size": 4, "max_length": 256, "learning_rate": 1e-4,
            "logging_steps": 1}


def bare_sft(cfg, messages: list) -> tuple[float, float | None, float | None]:
    """A plain TRL script on the same data and settings: (wall s, final train_loss, TRL's train_runtime s)."""
    import peft
    import trl
    from datasets import Dataset

    from autoif.policy import load_base, train_flags

    t0 = time.perf_counter()
    model, tok = load_base(cfg.policy)
    ds = Dataset.from_list([{"messages": m} for m in messages])
    with tempfile.TemporaryDirectory() as tmp:
        args = trl.SFTConfig(output_dir=str(Path(tmp) / "run"), seed=cfg.seed, report_to="none", save_strategy="no",
                             **cfg.train.sft, **train_flags(cfg.policy))
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                 peft_config=peft.LoraConfig(task_type="CAUSAL_LM", **cfg.train.lora))
        trainer.train()
        trainer.save_model(str(Path(tmp) / "weights"))
        seconds = time.perf_counter() - t0
    return seconds, _final(trainer.state.log_history, "train_loss"), _final(trainer.state.log_history, "train_runtime")


def _final(history: list, name: str) -> float | None:
    values = [h[name] for h in history if h.get(name) is not None]
    return float(values[-1]) if values else None


def in_thread(fn, *a):
    """``fn(*a)`` in a fresh worker thread, as the flow's thread task runner runs a task, so the ratio compares
    like with like (on a loaded 2-core machine one tiny-Qwen2 probe trained 8 steps in 0.8 s in a worker thread
    and 4-5 s in the main thread, another run showed no such gap); the main-thread script is reported too."""
    import threading

    out: dict = {}

    def target() -> None:
        try:
            out["value"] = fn(*a)
        except BaseException as e:  # noqa: BLE001  raised in the caller
            out["error"] = e

    t = threading.Thread(target=target, name="bare-sft")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def make_sft_flow():
    from autoif.flows import steps
    from prefect import flow

    from autoif.runtime.recording import pipeline_run

    @flow(name="bench-sft")
    def sft_flow(cfg, sft) -> dict:
        with pipeline_run(cfg, "bench") as run:
            t0 = time.perf_counter()
            ref = steps.train_sft(run, sft=sft)
            step_s = time.perf_counter() - t0
        return {"ref": ref, "step_s": step_s}

    return sft_flow


def flow_sft(sft_flow, cfg, ref, store) -> tuple[float, float, float | None, float, float | None]:
    """Our step through a Prefect flow: (flow wall s, step wall s, final train_loss, the task's own seconds,
    TRL's train_runtime s)."""
    from autoif.runtime import task_runner

    t0 = time.perf_counter()
    res = sft_flow.with_options(task_runner=task_runner(cfg.runtime))(cfg, ref)
    seconds = time.perf_counter() - t0
    row, _ = store.read_step(res["ref"])
    r = row.iloc[0]
    loss = float(r["train_loss"]) if r["train_loss"] == r["train_loss"] else None
    return seconds, float(res["step_s"]), loss, float(r["seconds"]), _final(json.loads(r["log_history"]), "train_runtime")


def bench_sft(args, work: Path, base: dict) -> None:
    from autoif.schemas.exports import TRLSFT
    from autoif.tasks.training import _conversation

    from autoif.config import load_config
    from autoif.store import Store

    store = Store(str(work / "store"))
    export = sft_export(args.sft_rows)
    ref = stored(store, export, "export_trl_sft", TRLSFT)
    messages = [_conversation(m) for m in store.read_step(ref)[0]["messages"]]  # as the step reads them
    cfg_of = lambda name, steps: load_config(overrides={**base, "run_name": name,  # noqa: E731
                                                        "train.sft": sft_values(args, steps)})
    sft_flow = make_sft_flow()
    say("sft.setup", f"{args.sft_rows} rows, {args.sft_steps} steps, batch 4, max_length 256, LoRA "
        f"{json.dumps(cfg_of('x', 1).train.lora)}")
    t0 = time.perf_counter()  # warm-up, not timed: imports, model files in the page cache, the training code paths
    in_thread(bare_sft, cfg_of("warm", 1), messages)
    flow_sft(sft_flow, cfg_of("sft-warm", 1), ref, store)
    say("sft.warmup_s", time.perf_counter() - t0, "one 1-step run of each (not timed below)")
    bare, ours = [], []
    for r in range(args.repeat):  # alternated, so neither side always gets the warmer machine
        order = ["bare", "flow"] if r % 2 == 0 else ["flow", "bare"]
        for side in order:
            if side == "bare":
                bare.append(in_thread(bare_sft, cfg_of(f"bare-{r}", args.sft_steps), messages))
            else:  # a fresh run name each time: computed, not answered from the store or Prefect's cache
                ours.append(flow_sft(sft_flow, cfg_of(f"sft-flow-{r}", args.sft_steps), ref, store))
    main_s = bare_sft(cfg_of("bare-main", args.sft_steps), messages)[0]  # the plain script, in the main thread
    bare_s = statistics.median(b[0] for b in bare)
    flow_s = statistics.median(o[0] for o in ours)
    say("sft_bare_runs_s", json.dumps([round(b[0], 2) for b in bare]))
    say("sft_flow_runs_s", json.dumps([round(o[0], 2) for o in ours]))
    say("sft_flow.step_s", statistics.median(o[1] for o in ours), "the step inside the flow (task run, store, MLflow training run)")
    say("sft_flow.task_s", statistics.median(o[3] for o in ours), "the task's own trainer + train + save (TrainedModels.seconds)")
    say("sft_bare.loss", bare[-1][1])
    say("sft_flow.loss", ours[-1][2])
    same = bare[-1][1] is not None and ours[-1][2] is not None and abs(bare[-1][1] - ours[-1][2]) <= 1e-4 * max(1.0, abs(bare[-1][1]))
    say("same_loss", same, "both trained the same thing (final train_loss)")
    say("sft_bare_s", bare_s, f"median of {len(bare)}")
    say("sft_flow_s", flow_s, f"median of {len(ours)}")
    say("sft_bare_main_s", main_s, "the same bare script once in the main thread (see in_thread)")
    say("sft_flow/bare", flow_s / bare_s, "goal <= 1.1 (the bare script in a worker thread, as the flow runs its task)")
    say("sft_flow/bare_main", flow_s / main_s, "against the main-thread run")
    # what is around trainer.train() (TRL's own train_runtime): the part of the wall that is not the same work
    # done faster or slower by a machine other jobs share
    b_out = statistics.median(b[0] - (b[2] or 0.0) for b in bare)
    f_out = statistics.median(o[0] - (o[4] or 0.0) for o in ours)
    train = statistics.median([b[2] for b in bare if b[2]] + [o[4] for o in ours if o[4]])
    say("sft_bare.train_runtime_s", json.dumps([round(b[2] or 0.0, 2) for b in bare]), "TRL's train() alone")
    say("sft_flow.train_runtime_s", json.dumps([round(o[4] or 0.0, 2) for o in ours]), "TRL's train() alone")
    say("sft_bare.outside_train_s", b_out, "median wall minus train_runtime: load, dataset, trainer, save")
    say("sft_flow.outside_train_s", f_out, "the same plus Prefect, store, MLflow, packing, logged model")
    say("sft_flow/bare.same_train", (train + f_out) / (train + b_out),
        f"both around the median train_runtime {train:.1f} s: the ratio without the machine's noise in train()")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny random Qwen2 of the tests: a fast smoke run")
    ap.add_argument("--iterations", type=int, default=2, help="online DPO rounds")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--samples", type=int, default=4, help="K samples per prompt and iteration")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="DPO steps per online round")
    ap.add_argument("--dpo-lr", type=float, default=2e-4)
    ap.add_argument("--sft-rows", type=int, default=32)
    ap.add_argument("--sft-steps", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of each SFT side (alternating)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--skip-online", action="store_true")
    ap.add_argument("--skip-sft", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="autoif-online-toy-"))
    work.mkdir(parents=True, exist_ok=True)
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "TOKENIZERS_PARALLELISM": "false", "PREFECT_HOME": str(work / "prefect"),
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                 "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
                 "MLFLOW_ENABLE_TELEMETRY": "false"}.items():
        os.environ.setdefault(k, v)

    from autoif.runtime.orchestration import share_prefect_api

    t0 = time.perf_counter()
    if args.tiny:
        from tests.tiny_models import build_tiny_qwen2

        policy = {"policy.model": "tiny-qwen2", "policy.model_path": str(build_tiny_qwen2(work / "tiny" / "qwen2"))}
    else:
        from autoif.config import PolicyConfig
        from autoif.policy import base_model_dir

        base_model_dir(PolicyConfig())  # the embedded GGUF as a Hugging Face directory (converted once, cached)
        policy = {"policy.model": "gemma3-270m", "policy.model_path": None}
    script = work / "script.jsonl"
    script.write_text("")  # no judge or supervision call is expected: an empty scripted engine
    base = {"store.root": str(work / "store"), "tracking.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
            "engine.kind": "scripted", "engine.model": "scripted", "engine.scripted_path": str(script),
            # strong_to_weak: the policy is its own model (self_alignment would make it follow the engine)
            "setting": "strong_to_weak", "policy.engine": "transformers", "policy.device": args.device, **policy}
    share_prefect_api()  # the ephemeral Prefect server, started before anything is timed
    say("policy", "tiny-qwen2 (random weights)" if args.tiny else "gemma3-270m (embedded GGUF, dequantised)")
    say("setup_s", time.perf_counter() - t0, "model files, Prefect server start (not timed below)")
    try:
        if not args.skip_online:
            bench_online(args, work, base)
        if not args.skip_sft:
            bench_sft(args, work, base)
    finally:
        print(json.dumps(RESULTS, default=str))
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
