"""The AutoIF steps as the flows use them: each task function with its output contract (Pandera schema), its
config section, its metrics and how it is batched. ``step(run, input=ref)`` runs it as cached, retryable
Prefect task runs (``autoif.runtime``); ``step.pure(...)`` calls the plain function.
"""
from __future__ import annotations

from functools import partial

from autoif.schemas.evaluation import (
    EvalPrompts,
    EvalResponses,
    FollowBenchScores,
    InstructionScores,
)
from autoif.schemas.exports import TRLDPO, TRLSFT, HFIndex, LlamaFactoryRows
from autoif.schemas.instructions import Instructions, Seeds
from autoif.schemas.training import TrainedModels
from autoif.schemas.stage_b import (
    Decontaminated,
    DPOPairs,
    Queries,
    QueryPairs,
    Responses,
    Scored,
    SFTRows,
    StageBInstructions,
    Verified,
)
from autoif.schemas.verifiers import (
    BackTranslated,
    Consistent,
    CrossValidated,
    ReferenceAgreement,
    VerifierCandidates,
)
from autoif.tasks import back_translation as bt
from autoif.tasks import consistency_filter as cf
from autoif.tasks import contamination as ct
from autoif.tasks import cross_validation as cv
from autoif.tasks import evaluate as ev
from autoif.tasks import exports as ex
from autoif.tasks import quality_filter as qf
from autoif.tasks import queries as qs
from autoif.tasks import query_augmentation as qa
from autoif.tasks import reference_agreement as ra
from autoif.tasks import response_generation as rg
from autoif.tasks import seeds as sd
from autoif.tasks import self_instruct as si
from autoif.tasks import stage_b_instructions as sb
from autoif.tasks import training as tr
from autoif.tasks import training_data as td
from autoif.tasks import verification as vf
from autoif.tasks import verifier_synthesis as vs
from autoif.tasks.metrics import family_counts

from autoif.runtime import Step, StepSpec


def _seeds_digest(cfg) -> str:
    return sd.seeds_digest(cfg.self_instruct)


# --- stage A: instructions and verifiers (steps 1-4) ------------------------------------------------------

load_seeds = Step(StepSpec("seeds", sd.load_seeds, schema=Seeds, config="self_instruct", key_fields=("seeds_path",),
                           key_extra=_seeds_digest))  # keyed by the seed file's content

self_instruct = Step(StepSpec("self_instruct", si.self_instruct, schema=Instructions, config="self_instruct",
                              metrics=family_counts))

synthesize_verifiers = Step(StepSpec("verifier_synthesis", vs.synthesize_batch, schema=VerifierCandidates,
                                     config="verifier_synthesis", batches=vs.synthesis_batches, empty=vs.no_candidates,
                                     metrics=vs.synthesis_metrics))

cross_validate = Step(StepSpec("cross_validation", cv.cross_validate, schema=CrossValidated, config="cross_validation",
                               key_extra=cv.probes_digest, batches=cv.cv_batches, empty=cv.no_cross_validated,
                               batch_group="instruction_id", metrics=cv.cv_metrics, metrics_final=cv.cv_means))

reference_agreement = Step(StepSpec("reference_agreement", ra.reference_agreement, schema=ReferenceAgreement, config="cross_validation",
                                    key_extra=cv.probes_digest, metrics=ra.agreement_metrics, funnel_input="candidates"))

back_translate = Step(StepSpec("back_translation", bt.back_translate, schema=BackTranslated, config="back_translation",
                               batches=bt.bt_batches, empty=bt.no_back_translations, batch_group="instruction_id",
                               metrics=family_counts))

consistency_filter = Step(StepSpec("consistency_filter", cf.consistency_filter, schema=Consistent,
                                   config="consistency_filter", batches=cf.consistency_batches, empty=cf.no_consistent,
                                   batch_group="instruction_id", metrics=cf.consistency_metrics))


# --- stage B: queries, responses, verification, quality filter, training data (steps 5-8) ----------------


def _queries_digest(cfg) -> str:
    return qs.queries_digest(cfg.queries)


def _benchmarks_digest(cfg) -> dict:
    return ev.benchmark_files_digest(tuple(cfg.contamination.benchmarks))


stage_b_instructions = Step(StepSpec("stage_b_instructions", sb.stage_b_instructions, schema=StageBInstructions,
                                     config="seeds", funnel_input="instructions"))

load_queries = Step(StepSpec("queries", qs.load_queries, schema=Queries, config="queries", key_extra=_queries_digest))

augment_queries = Step(StepSpec("query_augmentation", qa.pair_queries, schema=QueryPairs, config="query_augmentation",
                                funnel_input="instructions"))

generate_responses = Step(StepSpec("response_generation", rg.generate_responses, schema=Responses,
                                   config="response_generation", batches=rg.response_batches, empty=rg.no_responses))

verify_responses = Step(StepSpec("verification", vf.verify, schema=Verified, config="verification",
                                 batches=vf.verification_batches, empty=vf.no_verified, metrics=vf.verification_metrics,
                                 metrics_final=vf.verification_means))

score_responses = Step(StepSpec("quality_filter", qf.score_responses, schema=Scored, config="quality_filter",
                                batches=qf.score_batches, empty=qf.no_scored, metrics=qf.score_metrics,
                                metrics_final=qf.score_means))

decontaminate = Step(StepSpec("contamination", ct.decontaminate, schema=Decontaminated, config="contamination",
                              key_extra=_benchmarks_digest, with_dropped=("verified",)))

sft_rows = Step(StepSpec("sft", td.sft_rows, schema=SFTRows))

query_dpo = Step(StepSpec("query_dpo", td.query_pairs, schema=DPOPairs, config="pairs", with_dropped=("verified",),
                          funnel_input="verified"))  # `verified`: the contamination step's rows, failures included

instruction_dpo = Step(StepSpec("instruction_dpo", td.instruction_pairs, schema=DPOPairs, config="instruction_pairs"))


# --- step 12: evaluation ----------------------------------------------------------------------------------


class EvaluationSteps:
    """The three steps of one evaluation (``<benchmark>_prompts``, ``_responses``, ``_scores``), keyed by
    its :class:`~autoif.tasks.evaluate.EvalSpec` (benchmark, responses file, limit, judge). A policy evaluation
    (``spec.policy_label``) answers with the policy and names its responses and scores steps after the label
    (``ifeval_responses_sft``); its responses step takes the model as input ``model`` (none: the base)."""

    def __init__(self, spec: ev.EvalSpec) -> None:
        b = spec.benchmark.value
        self.prompts = Step(StepSpec(f"{b}_prompts", ev.load_benchmark, schema=EvalPrompts, config="eval",
                                     params={"benchmark": spec.benchmark, "limit": spec.limit},
                                     key_extra=partial(ev.prompts_key, spec)))
        if spec.policy_label is not None:  # the policy (base, or base + the input `model`) answers
            self.responses = Step(StepSpec(f"{b}_responses{spec.step_suffix}", ev.answer_with_policy, schema=EvalResponses,
                                           key_extra=ev.policy_answer_key, funnel_input="prompts"))
        elif spec.responses_path is not None:
            self.responses = Step(StepSpec(f"{b}_responses", ev.responses_from_file, schema=EvalResponses, config="eval",
                                           params={"path": spec.responses_path},
                                           key_extra=partial(ev.responses_key, spec)))
        else:
            self.responses = Step(StepSpec(f"{b}_responses", ev.answer_batch, schema=EvalResponses, config="eval",
                                           batches=ev.answer_batches, empty=ev.no_responses))
        scorer = ev.score_with_judge if ev.needs_judge(spec) else ev.score
        schema = FollowBenchScores if spec.benchmark is ev.Benchmark.followbench else InstructionScores
        self.scores = Step(StepSpec(f"{b}_scores{spec.step_suffix}", scorer, schema=schema, config="eval", params={"benchmark": spec.benchmark},
                                    engine=spec.judge or "engine", key_extra=ev.scores_key, funnel_input="responses",
                                    metrics=partial(ev.metrics_of, spec.benchmark)))


# --- exports: the training data as TRL, LLaMA-Factory and Hugging Face datasets read it -------------------


export_trl_sft = Step(StepSpec("export_trl_sft", ex.trl_sft, schema=TRLSFT))

export_trl_dpo = Step(StepSpec("export_trl_dpo", ex.trl_dpo, schema=TRLDPO, config="exports", key_fields=("dpo_levels",)))

export_llamafactory = Step(StepSpec("export_llamafactory", ex.llamafactory, schema=LlamaFactoryRows, config="exports",
                                    key_fields=("dataset_name", "dpo_levels")))


def export_hf(card: ex.CardFacts) -> Step:
    """The Hugging Face datasets export of one run: the facts its dataset card states (the run's funnel, read
    from the step manifests by the flow; source, licence, generation settings) are a fixed parameter, part of
    its key."""
    return Step(StepSpec("export_hf", ex.hf_dataset, schema=HFIndex, config="exports", params={"card_facts": card}))


# --- stage C: training (steps 9-10); each its own MLflow run while it trains ------------------------------


def _training_key(cfg) -> dict:
    """Training reads the whole run config (train, policy): the parts that change the model are its key."""
    from autoif.policy import base_identity

    return {"train": cfg.train.model_dump(mode="json", exclude={"register_model"}),
            "policy": cfg.policy.model_dump(mode="json", include={"model", "model_path", "device"}),
            "base": base_identity(cfg.policy)}


train_sft = Step(StepSpec("train_sft", tr.train_sft, schema=TrainedModels, key_extra=_training_key, tracked=True,
                          retries=0))

train_dpo = Step(StepSpec("train_dpo", tr.train_dpo, schema=TrainedModels, key_extra=_training_key, tracked=True,
                          funnel_input="dpo", retries=0))
