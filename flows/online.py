"""AutoIF step 10 as a flow: N online iterations, each from the previous iteration's model.

Iteration i: the policy samples K responses per training prompt at T=0.8 -> stage B's verification in the
sandbox (kept: pass rate meets ``online.chosen_pass_rate``) -> the contamination check -> the quality gate (stage B's score filter, against
reward hacking; off: no LLM call) -> query-level pairs (chosen > 0.5, rejected == 0) -> one DPO round from the
previous model. Every one of these is a cached step named per iteration (``online2_samples`` ...), so a run
killed in iteration 3 resumes there, iterations 1 and 2 answered from the store.

With ``online.algorithm: grpo`` an iteration is one cached, tracked step instead, ``grpo<i>_train``: TRL's
``GRPOTrainer`` samples K completions per prompt from the previous model, scores each with the same sandboxed
verifiers (its reward function: the pass rate of the prompt's instruction's functions) and trains on the
group-relative advantages; the curve is the metric histories ``grpo.<name>``.
"""
from __future__ import annotations

import dataclasses

from autoif.flows import steps
from autoif.schemas.stage_b import DPOPairs, Responses, Scored
from autoif.schemas.training import TrainedModels
from autoif.tasks import online as on
from autoif.tasks import training as tr

from autoif.config import OnlineAlgorithm, PairsConfig, RunConfig
from autoif.runtime import Step, StepSpec
from autoif.runtime.recording import PipelineRun
from autoif.store import StepRef


def online_config(cfg: RunConfig) -> RunConfig:
    """The run config the iteration's stage B steps see: the online thresholds in place of stage B's."""
    o = cfg.online
    return cfg.model_copy(update={
        "verification": cfg.verification.model_copy(update={"pass_rate": o.chosen_pass_rate}),
        "pairs": PairsConfig(chosen_pass_rate=o.chosen_pass_rate, rejected_pass_rate=o.rejected_pass_rate,
                             max_chosen_per_prompt=o.max_chosen_per_prompt, max_rejected_per_prompt=o.max_rejected_per_prompt)})


def _online_key(cfg: RunConfig) -> dict:
    return {**steps._training_key(cfg), "online": cfg.online.model_dump(mode="json")}


def _named(step: Step, name: str) -> Step:
    return Step(dataclasses.replace(step.spec, name=name))


def iteration_steps(cfg: RunConfig, i: int) -> dict[str, Step]:
    p = f"online{i}"
    return {
        "samples": Step(StepSpec(f"{p}_samples", on.sample_responses, schema=Responses, params={"iteration": i},
                                 key_extra=_online_key, funnel_input="prompts")),
        "verification": _named(steps.verify_responses, f"{p}_verification"),
        "contamination": _named(steps.decontaminate, f"{p}_contamination"),
        "quality": _named(steps.score_responses, f"{p}_quality"),
        "ungated": Step(StepSpec(f"{p}_ungated", on.ungated, schema=Scored)),
        "pairs": _named(steps.query_dpo, f"{p}_pairs"),
        "train": Step(StepSpec(f"{p}_train", tr.train_dpo, schema=TrainedModels, key_extra=_online_key, tracked=True,
                               funnel_input="dpo", retries=0,
                               params={"model_id": f"online-{i}", "method": "online_dpo", "iteration": i,
                                       "overrides": dict(cfg.online.dpo)})),
    }


def grpo_step(cfg: RunConfig, i: int) -> Step:
    """Iteration ``i`` of online GRPO: sample K per prompt, reward by the sandboxed verifiers, one GRPO round."""
    return Step(StepSpec(f"grpo{i}_train", tr.train_grpo, schema=TrainedModels, key_extra=_online_key, tracked=True,
                         funnel_input="prompts", retries=0,
                         params={"model_id": f"grpo-{i}", "method": "grpo", "iteration": i,
                                 "overrides": dict(cfg.online.grpo)}))


def online_iterations(run: PipelineRun, prompts: StepRef, init: StepRef) -> dict[str, StepRef]:
    """``cfg.online.iterations`` rounds from ``init`` (the offline DPO model); per-iteration values on the
    pipeline's MLflow run as metric histories ``online.<name>`` (``grpo.<name>`` for GRPO; step = iteration)."""
    run = dataclasses.replace(run, cfg=online_config(run.cfg))  # shares the run's funnels, usage and MLflow run
    if run.cfg.online.algorithm is OnlineAlgorithm.grpo:
        return grpo_iterations(run, prompts, init)
    refs: dict[str, StepRef] = {}
    model = init
    for i in range(1, run.cfg.online.iterations + 1):
        s = iteration_steps(run.cfg, i)
        samples = refs[s["samples"].name] = s["samples"](run, prompts=prompts, init=model)  # K at T=0.8
        verified = refs[s["verification"].name] = s["verification"](run, responses=samples)  # sandbox pass rates
        checked = refs[s["contamination"].name] = s["contamination"](run, verified=verified)  # 13-gram overlap
        if run.cfg.online.quality_gate:  # a chosen sample must also pass stage B's quality score
            clean = refs[s["quality"].name] = s["quality"](run, clean=checked)
        else:
            clean = refs[s["ungated"].name] = s["ungated"](run, verified=checked)
        pairs = refs[s["pairs"].name] = s["pairs"](run, verified=checked, clean=clean)  # chosen > 0.5, rejected 0
        n_pairs = _kept(run, pairs)
        if n_pairs:
            model = refs[s["train"].name] = s["train"](run, dpo=pairs, init=model)  # one DPO round
        else:
            print(f"online iteration {i}: no pairs: the model carries over untrained")
        run.log_iteration("online", i, on.iteration_summary(
            run.store.read_step(verified)[0], _kept(run, checked), _kept(run, clean), n_pairs,
            run.store.read_step(model)[0] if n_pairs else None))
    return refs


def grpo_iterations(run: PipelineRun, prompts: StepRef, init: StepRef) -> dict[str, StepRef]:
    """Online GRPO: each iteration one GRPO round from the previous model, rewarded in the sandbox."""
    refs: dict[str, StepRef] = {}
    model = init
    for i in range(1, run.cfg.online.iterations + 1):
        step = grpo_step(run.cfg, i)
        model = refs[step.name] = step(run, prompts=prompts, init=model)  # K samples, verifier rewards, GRPO update
        run.log_iteration("grpo", i, tr.grpo_summary(run.store.read_step(model)[0]))  # mean reward = pass rate
    return refs


def _kept(run: PipelineRun, ref: StepRef) -> int:
    m = run.store.manifest(ref.run, ref.step, ref.key)
    return int((m.meta.get("funnel") or {}).get("rows_out", 0)) if m else 0
