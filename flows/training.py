"""Stage C: the training data becomes a better model (AutoIF steps 9-12).

SFT on the TRL SFT export -> offline DPO on the preference export, starting from the SFT adapter -> online
iterations from the DPO model (sample K at T=0.8, verify in the sandbox, quality gate, pair, one DPO round; or
GRPO with the verifiers as reward) -> evaluate the base policy and each trained one. Every training step is a
cached Prefect task with its own MLflow run (TRL's metrics, the dataset it read, the logged model).
"""
from __future__ import annotations

import re

from autoif.flows import steps
from autoif.flows.evaluate import evaluate_policy
from autoif.flows.instructions import stage_a
from autoif.flows.online import online_iterations
from prefect import flow

from autoif.config import PipelineStep, RunConfig
from autoif.runtime.recording import PipelineRun, pipeline_run
from autoif.store import StepRef


def stage_c(run: PipelineRun, data: dict[str, StepRef], until: PipelineStep = PipelineStep.evaluation) -> dict[str, StepRef]:
    """Stage B's exports (and its prompts) -> trained models -> their evaluations; ``until`` stops after a step.
    Without SFT rows nothing trains and only the base policy is evaluated."""
    last = PipelineStep(until).position
    reached = lambda step: last >= step.position  # noqa: E731
    run.cfg.train.check()  # TRL's and peft's config objects construct: an unknown field fails before training
    run.cfg.online.check()
    refs: dict[str, StepRef] = {}
    if not _rows(run, data["export_trl_sft"]):
        print("stage C: the SFT export has no rows: nothing to train")
        return evaluate_policies(run, refs) if reached(PipelineStep.evaluation) else refs
    refs["train_sft"] = steps.train_sft(run, sft=data["export_trl_sft"])  # 9. SFT (LoRA, or full)
    if reached(PipelineStep.train_dpo) and _rows(run, data["export_trl_dpo"]):
        refs["train_dpo"] = steps.train_dpo(run, dpo=data["export_trl_dpo"], init=refs["train_sft"])  # 9. offline DPO
    if reached(PipelineStep.online) and run.cfg.online.iterations:  # 10. on-policy rounds from the latest model
        refs.update(online_iterations(run, prompts=data["query_augmentation"], init=refs.get("train_dpo", refs["train_sft"])))
    if reached(PipelineStep.evaluation):  # 12. the base and each trained policy on the benchmark subset
        refs.update(evaluate_policies(run, refs))
    return refs


def evaluate_policies(run: PipelineRun, models: dict[str, StepRef]) -> dict[str, StepRef]:
    """The base policy, then SFT, offline DPO and the last online iteration: each its own MLflow run nested under
    the pipeline's and linked to its training run; the comparison printed (``autoif compare --pipeline``)."""
    results: dict[str, dict[str, float]] = {}
    refs: dict[str, StepRef] = {}
    for label, step in {"base": None, **trained_models(run, models)}.items():
        out = evaluate_policy(run, None if step is None else models[step], label)
        if out is not None:
            results[label] = out["metrics"]
            refs.update(out["refs"])
    print("evaluation of the policies:\n" + comparison_text(results))
    return refs


def trained_models(run: PipelineRun, refs: dict[str, StepRef]) -> dict[str, str]:
    """label -> step name of the models to evaluate: SFT, offline DPO and the last online iteration."""
    out = {"sft": "train_sft"}
    if "train_dpo" in refs:
        out["dpo"] = "train_dpo"
    online = [m for m in (re.fullmatch(r"(online|grpo)(\d+)_train", name) for name in refs) if m]
    if online:  # the last iteration that trained: online3_train -> "online-3"
        last = max(online, key=lambda m: int(m[2]))
        out[f"{last[1]}-{last[2]}"] = last[0]
    return out


def _rows(run: PipelineRun, ref: StepRef) -> int:
    m = run.store.manifest(ref.run, ref.step, ref.key)
    return int((m.meta.get("funnel") or {}).get("rows_out", 0)) if m else 0


def comparison_text(results: dict[str, dict[str, float]]) -> str:
    """The evaluation metrics of each model as one plain table (base, sft, dpo, online-N)."""
    names = sorted({k for m in results.values() for k in m if k.endswith("_acc") or k.endswith("pass_rate")})
    labels = list(results)
    width = max([len(n) for n in names] + [6])
    lines = [f"{'metric':<{width}} " + " ".join(f"{label:>10}" for label in labels)]
    for n in names:
        cells = [f"{results[label][n]:>10.4f}" if n in results[label] else f"{'-':>10}" for label in labels]
        lines.append(f"{n:<{width}} " + " ".join(cells))
    return "\n".join(lines)


@flow(name="autoif-train", flow_run_name="{cfg.run_name}-train", log_prints=True)
def build_models(cfg: RunConfig, until: PipelineStep = PipelineStep.evaluation) -> dict[str, StepRef]:
    """Stages A and B from the cache (computed when missing), then stage C."""
    from autoif.flows.data import stage_b

    with pipeline_run(cfg, "train") as run:
        a = stage_a(run)
        data = {**a, **stage_b(run, a)}
        return {**data, **stage_c(run, data, until)}
