"""Step 12: evaluate a model on IFEval, IFBench or FollowBench.

load the benchmark -> answer it (the configured engine, or a responses file) -> score it with the reference
checkers -> publish metrics, per-type tables and the responses on the run's MLflow run, linked to the
evaluated model's run. The full pipeline calls this flow for the base model and for each trained policy.
"""
from __future__ import annotations

from typing import Any

from autoif.flows.steps import EvaluationSteps
from autoif.tasks.evaluate import EvalSpec, metrics_of, model_label, tables_of
from prefect import flow

from autoif.config import EngineConfig, RunConfig
from autoif.evaluation.data import Benchmark
from autoif.runtime.recording import pipeline_run, publish_evaluation


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
        # publish: metrics, per-type tables and responses on the MLflow run, linked to the model's run
        scored, _ = run.store.read_step(scores)
        answered, _ = run.store.read_step(responses)
        metrics = metrics_of(spec.benchmark, scored)
        publish_evaluation(run, spec.benchmark.value, model_label(spec, cfg.engine), metrics,
                           tables_of(spec.benchmark, scored), answered, model_run_id)
        print(f"{spec.benchmark.value}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                   if k.endswith("acc") or k.startswith(("hsr", "ssr", "csl"))))
        return {"prompts": prompts, "responses": responses, "scores": scores, "metrics": metrics,
                "mlflow_run_id": run.parent_run_id}
