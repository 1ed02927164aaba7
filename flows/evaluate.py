"""Step 12: evaluate a model on IFEval, IFBench or FollowBench.

load the benchmark -> answer it (the configured engine, or a responses file) -> score it with the reference
checkers -> publish metrics, per-type tables and the responses on the run's MLflow run, linked to the
evaluated model's run.

Inside the pipeline, :func:`evaluate_policy` evaluates the base policy and each trained one (SFT, offline DPO,
the last online iteration): the policy answers (:func:`autoif.tasks.evaluate.answer_with_policy`, the trained
model as an input step, so its weights are in the key), each evaluation is its own MLflow run nested under
the pipeline's run, tagged ``autoif.eval.model`` = its label and linked to the model's training run.
:func:`pipeline_evaluations` finds them again for ``autoif compare --pipeline``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from autoif.flows.steps import EvaluationSteps
from autoif.tasks.evaluate import EvalSpec, metrics_of, model_label, tables_of
from prefect import flow

from autoif.config import EngineConfig, RunConfig
from autoif.evaluation.data import Benchmark
from autoif.runtime.recording import EVAL_TAG_MODEL, PipelineRun, pipeline_run, publish_evaluation
from autoif.store import StepRef

EVAL_TAG_BENCHMARKS = "autoif.eval.benchmarks"  # the benchmarks one policy evaluation ran, comma-separated
EVAL_TAG_WEIGHTS = "autoif.eval.weights_digest"  # the evaluated model's weights (absent: the base policy)
EVAL_TAG_MODEL_STEP = "autoif.eval.model_step"  # the training step that made the model (absent: the base)
HEADLINE = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")


@flow(name="autoif-evaluate", flow_run_name="{cfg.run_name}-eval-{benchmark}", log_prints=True)
def evaluate(
    cfg: RunConfig,
    benchmark: str = "ifeval",
    responses_path: str | None = None,
    model_run_id: str | None = None,
    limit: int | None = None,
    judge: EngineConfig | None = None,
) -> dict[str, Any]:
    """Returns the step outputs (``prompts``, ``responses``, ``scores``), ``metrics`` and ``mlflow_run_id``."""
    spec = EvalSpec(Benchmark(benchmark), responses_path=responses_path, limit=limit, judge=judge)
    steps = EvaluationSteps(spec)
    with pipeline_run(cfg, f"eval-{spec.benchmark.value}") as run:
        prompts = steps.prompts(run)
        responses = steps.responses(run, prompts=prompts)
        scores = steps.scores(run, prompts=prompts, responses=responses)
        metrics = _publish(run, spec, scores, responses, model_label(spec, cfg.engine), model_run_id)
        return {"prompts": prompts, "responses": responses, "scores": scores, "metrics": metrics,
                "mlflow_run_id": run.parent_run_id}


def _publish(run: PipelineRun, spec: EvalSpec, scores: StepRef, responses: StepRef, label: str,
             model_run_id: str | None) -> dict[str, float]:
    """Metrics, per-type tables and responses on the evaluation's MLflow run, linked to the model's run."""
    scored, _ = run.store.read_step(scores)
    answered, _ = run.store.read_step(responses)
    metrics = metrics_of(spec.benchmark, scored)
    publish_evaluation(run, spec.benchmark.value, label, metrics, tables_of(spec.benchmark, scored), answered, model_run_id)
    print(f"{spec.benchmark.value} ({label}): " + ", ".join(
        f"{k}={v:.4f}" for k, v in metrics.items() if k.endswith("acc") or k.startswith(("hsr", "ssr", "csl"))))
    return metrics


def evaluate_policy(
    parent: PipelineRun | RunConfig,
    model: StepRef | None,
    label: str,
    model_run_id: str | None = None,
    benchmark: str | Sequence[str] | None = None,
    limit: int | None = None,
) -> dict[str, Any] | None:
    """Evaluate the policy: the base (``model`` None) or base + the trained model ``model`` (a finished training
    step's ``TrainedModels`` output, one kept row), on ``benchmark`` (one name or several; default
    ``eval.pipeline_benchmarks``), the first ``limit`` items (default ``eval.pipeline_limit``), answers at
    ``eval.temperature`` with at most ``eval.pipeline_max_tokens`` tokens.

    Call it inside a flow. With a :class:`PipelineRun` ``parent`` (the pipeline's), the evaluation is an MLflow run
    nested under the pipeline's run (``<run_name>:eval-<label>``), linked to the model's training run
    (``model_run_id``, default ``parent.training_runs[model.step]``), and its LLM usage counts in the pipeline's;
    with a :class:`RunConfig` it is a top-level run. Tags: ``autoif.eval.model`` = ``label``, the benchmarks,
    the model's step and weights digest. Every step is cached: a second call with nothing changed generates
    nothing.

    Returns ``{"label", "metrics": {"<benchmark>.<metric>": value}, "by_benchmark": {benchmark: metrics},
    "mlflow_run_id", "model_run_id", "refs": {step name: StepRef}}``, or None when ``model`` has no kept row
    (its training step dropped it: nothing to evaluate; said on stdout).
    """
    is_run = isinstance(parent, PipelineRun)
    cfg = parent.cfg if is_run else parent
    names = [benchmark] if isinstance(benchmark, str) else list(benchmark or cfg.eval.pipeline_benchmarks)
    benchmarks = [Benchmark(b) for b in names]
    if not benchmarks:
        raise ValueError("evaluate_policy: no benchmark (eval.pipeline_benchmarks is empty)")
    limit = cfg.eval.pipeline_limit if limit is None else limit
    weights_digest = None
    if model is not None:
        store = parent.store if is_run else None
        if store is None:
            from autoif.store import Store

            store = Store.from_config(cfg.store)
        info = store.read_columns(model, ["model_id", "weights_digest", "reason"])
        kept = info[info["reason"].isna()] if "reason" in info else info
        if not len(kept):
            reasons = sorted(set(info["reason"].dropna())) if "reason" in info else []
            print(f"evaluation of {label}: {model.step} has no kept model ({', '.join(reasons) or 'no rows'}): not evaluated")
            return None
        weights_digest = str(kept["weights_digest"].iloc[0])
        if model_run_id is None and is_run:
            model_run_id = parent.training_runs.get(model.step)
    out: dict[str, Any] = {"label": label, "metrics": {}, "by_benchmark": {}, "refs": {}, "model_run_id": model_run_id}
    with pipeline_run(cfg, f"eval-{label}", parent_run_id=parent.parent_run_id if is_run else None) as run:
        client = run.tracker.client
        client.set_tag(run.parent_run_id, EVAL_TAG_MODEL, label)
        if model is not None:
            client.set_tag(run.parent_run_id, EVAL_TAG_MODEL_STEP, model.step)
            client.set_tag(run.parent_run_id, EVAL_TAG_WEIGHTS, weights_digest)
        for b in benchmarks:
            spec = EvalSpec(b, limit=limit, policy_label=label)
            steps = EvaluationSteps(spec)
            prompts = steps.prompts(run)
            responses = steps.responses(run, prompts=prompts, **({"model": model} if model is not None else {}))
            scores = steps.scores(run, prompts=prompts, responses=responses)
            metrics = _publish(run, spec, scores, responses, label, model_run_id)
            out["by_benchmark"][b.value] = metrics
            out["metrics"].update({f"{b.value}.{k}": v for k, v in metrics.items()})
            out["refs"].update({steps.prompts.name: prompts, steps.responses.name: responses, steps.scores.name: scores})
        client.set_tag(run.parent_run_id, EVAL_TAG_BENCHMARKS, ",".join(b.value for b in benchmarks))
        out["mlflow_run_id"] = run.parent_run_id
    if is_run:
        parent.add_usage(run.usage)
    return out


# --- finding a pipeline's evaluations again (``autoif compare --pipeline``) -----------------------------------


def label_order(label: str) -> tuple:
    """base, sft, dpo, online-1.., grpo-1.., then any other label alphabetically."""
    fixed = {"base": 0, "sft": 1, "dpo": 2}
    if label in fixed:
        return (fixed[label], 0, label)
    m = re.fullmatch(r"(online|grpo)-(\d+)", label)
    if m:
        return (3 if m[1] == "online" else 4, int(m[2]), label)
    return (5, 0, label)


@dataclass
class PassRate:
    """A verifier pass rate the pipeline run logged: whose responses, sampled by which policy (None: the
    supervision engine of stage B), and the mean pass rate."""

    what: str
    policy: str | None
    value: float


@dataclass
class PipelineEvaluations:
    pipeline: Any  # mlflow.entities.Run
    evaluations: list[Any]  # one Run per model label, ordered by label_order
    pass_rates: list[PassRate] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [r.data.tags[EVAL_TAG_MODEL] for r in self.evaluations]


class PipelineNotFound(LookupError):
    pass


def _has_tag(name: str) -> str:
    return f"tags.`{name}` LIKE '%'"


def find_pipeline_run(client, experiment_id: str, ref: str | None = None):
    """The pipeline run ``ref`` names (an MLflow run id, an MLflow run name, or the autoif ``run_name``, newest
    first); no ``ref``: the newest run that has nested policy evaluations."""
    from mlflow.exceptions import MlflowException

    evals = f"{_has_tag(EVAL_TAG_MODEL)} and {_has_tag('mlflow.parentRunId')}"
    if ref is not None:
        try:
            return client.get_run(ref)
        except MlflowException:
            pass
        hits = client.search_runs([experiment_id], f"attributes.run_name = '{ref}'", order_by=["start_time DESC"],
                                  max_results=1)
        if hits:
            return hits[0]
        evals += f" and tags.`autoif.run_name` = '{ref}'"
    hits = client.search_runs([experiment_id], evals, order_by=["start_time DESC"], max_results=1)
    if not hits:
        raise PipelineNotFound(f"no pipeline run {ref!r} (run id, run name or autoif run_name) with policy evaluations"
                               if ref is not None else "no pipeline run with policy evaluations")
    return client.get_run(hits[0].data.tags["mlflow.parentRunId"])


def pipeline_evaluations(client, experiment_id: str, ref: str | None = None) -> PipelineEvaluations:
    """The pipeline run, its policy evaluations (the newest per label, ordered base, sft, dpo, online-N) and the
    verifier pass rates it logged: stage B's responses (``verification.pass_rate.mean``) and, per online
    iteration, the policy's samples (``online.pass_rate`` at step i), with the policy that sampled them (the
    iteration's starting model: dpo, else sft, then the last iteration that built pairs and trained)."""
    pipeline = find_pipeline_run(client, experiment_id, ref)
    pid = pipeline.info.run_id
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{pid}'", order_by=["start_time DESC"],
                                  max_results=5000)
    newest: dict[str, Any] = {}
    for r in children:
        label = r.data.tags.get(EVAL_TAG_MODEL)
        if label is not None and label not in newest:
            newest[label] = r
    evaluations = [newest[k] for k in sorted(newest, key=label_order)]
    m = pipeline.data.metrics
    rates: list[PassRate] = []
    if "verification.pass_rate.mean" in m:
        rates.append(PassRate("stage B responses (supervision engine)", None, m["verification.pass_rate.mean"]))
    for prefix in ("online", "grpo"):
        history = {h.step: h.value for h in client.get_metric_history(pid, f"{prefix}.pass_rate")}
        trained = {h.step: h.value for h in client.get_metric_history(pid, f"{prefix}.pairs")}
        current = "dpo" if "train_dpo.rows_out" in m else "sft" if "train_sft.rows_out" in m else None
        for i in sorted(history):
            rates.append(PassRate(f"{prefix} iteration {i} samples", current, history[i]))
            if trained.get(i, 1.0) > 0:  # an iteration without pairs trains nothing: the model carries over
                current = f"{prefix}-{i}"
    return PipelineEvaluations(pipeline=pipeline, evaluations=evaluations, pass_rates=rates)
