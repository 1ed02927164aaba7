"""Stage B: queries, responses, verification, quality filter and the training data (AutoIF steps 5-8)."""
from __future__ import annotations

from autoif.flows import steps
from autoif.flows.instructions import stage_a
from autoif.tasks.exports import card_facts
from prefect import flow

from autoif.config import PipelineStep, RunConfig
from autoif.runtime.recording import PipelineRun, pipeline_run
from autoif.store import StepRef


def stage_b(run: PipelineRun, a: dict[str, StepRef], until: PipelineStep = PipelineStep.exports) -> dict[str, StepRef]:
    """Stage A's instructions (and the seeds' reference verifiers when asked) -> queries -> K responses per
    (instruction, query) -> verification in the sandbox -> contamination check -> quality score -> SFT rows,
    query-level and instruction-level DPO pairs -> exports; ``until`` stops after the named step."""
    last = PipelineStep(until).position
    reached = lambda step: last >= step.position  # noqa: E731
    refs: dict[str, StepRef] = {}
    refs["stage_b_instructions"] = steps.stage_b_instructions(  # survivors + seeds with reference functions
        run, instructions=a["consistency_filter"], selected=a["self_instruct"], seeds=a["seeds"])
    if reached(PipelineStep.queries):
        refs["queries"] = steps.load_queries(run)  # 5. real user queries, 20 < len < 300
    if reached(PipelineStep.query_augmentation):
        refs["query_augmentation"] = steps.augment_queries(run, instructions=refs["stage_b_instructions"],
                                                           queries=refs["queries"])  # 5. 16 queries per instruction
    if reached(PipelineStep.response_generation):
        refs["response_generation"] = steps.generate_responses(run, pairs=refs["query_augmentation"])  # 5. K responses
    if reached(PipelineStep.verification):
        refs["verification"] = steps.verify_responses(run, responses=refs["response_generation"])  # 6. pass rates
    if reached(PipelineStep.contamination):
        refs["contamination"] = steps.decontaminate(run, verified=refs["verification"])  # 13-gram overlap, all rows
    if reached(PipelineStep.quality_filter):
        refs["quality_filter"] = steps.score_responses(run, clean=refs["contamination"])  # 7. relevance score
    if reached(PipelineStep.sft):
        refs["sft"] = steps.sft_rows(run, clean=refs["quality_filter"])  # 8. SFT rows
    if reached(PipelineStep.query_dpo):
        refs["query_dpo"] = steps.query_dpo(run, verified=refs["contamination"], clean=refs["quality_filter"])  # 8. pairs
    if reached(PipelineStep.instruction_dpo):
        refs["instruction_dpo"] = steps.instruction_dpo(run, instructions=refs["stage_b_instructions"])  # 8. case pairs
    if reached(PipelineStep.exports):  # the training data as TRL, LLaMA-Factory and HF datasets read it
        # the run's funnel as its manifests recorded it, for the dataset card (read before the exports join)
        funnel = [{**run.store.manifest(r.run, r.step, r.key).meta["funnel"], "digest": r.digest}
                  for r in {**a, **refs}.values()]
        refs["export_trl_sft"] = steps.export_trl_sft(run, sft=refs["sft"])
        refs["export_trl_dpo"] = steps.export_trl_dpo(run, query_dpo=refs["query_dpo"], instruction_dpo=refs["instruction_dpo"])
        refs["export_llamafactory"] = steps.export_llamafactory(run, sft=refs["sft"], query_dpo=refs["query_dpo"],
                                                                instruction_dpo=refs["instruction_dpo"])
        refs["export_hf"] = steps.export_hf(card_facts(run.cfg, funnel))(run, sft=refs["export_trl_sft"],
                                                                         dpo=refs["export_trl_dpo"])
    return refs


@flow(name="autoif-data", flow_run_name="{cfg.run_name}-data", log_prints=True)
def build_data(cfg: RunConfig, until: PipelineStep = PipelineStep.exports) -> dict[str, StepRef]:
    """Stages A and B on their own (stage A's finished steps come from the cache)."""
    with pipeline_run(cfg, "data") as run:
        a = stage_a(run)
        return {**a, **stage_b(run, a, until)}
