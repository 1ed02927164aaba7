"""Stage A: instructions and verification functions (AutoIF steps 1-4)."""
from __future__ import annotations

from autoif.flows import steps
from prefect import flow

from autoif.config import PipelineStep, RunConfig
from autoif.runtime.recording import PipelineRun, log_survival, pipeline_run
from autoif.store import StepRef


def stage_a(run: PipelineRun, until: PipelineStep = PipelineStep.consistency_filter) -> dict[str, StepRef]:
    """Seeds -> self-instruct -> verifier synthesis -> cross-validation -> back-translation -> consistency
    filter; ``until`` stops after the named step."""
    last = PipelineStep(until).position
    refs = {"seeds": steps.load_seeds(run)}
    refs["self_instruct"] = steps.self_instruct(run, seeds=refs["seeds"])  # 1. seeds + self-instruct, deduplicated
    if last >= 1:
        refs["verifier_synthesis"] = steps.synthesize_verifiers(run, instructions=refs["self_instruct"])  # 2. K funcs + cases
    if last >= 2:
        refs["cross_validation"] = steps.cross_validate(run, candidates=refs["verifier_synthesis"])  # 3. in the sandbox
        # seeds with a shipped reference function: how well did synthesis do where the answer is known?
        refs["reference_agreement"] = steps.reference_agreement(run, candidates=refs["verifier_synthesis"], seeds=refs["seeds"])
    if last >= 3:
        refs["back_translation"] = steps.back_translate(run, validated=refs["cross_validation"])  # 4. functions -> text
    if last >= 4:
        refs["consistency_filter"] = steps.consistency_filter(run, translated=refs["back_translation"])  # 4. NLI / judge
        log_survival(run, refs["self_instruct"], refs["consistency_filter"])  # per seed family, whole stage
    return refs


@flow(name="autoif-instructions", flow_run_name="{cfg.run_name}-instructions", log_prints=True)
def build_instructions(cfg: RunConfig, until: PipelineStep = PipelineStep.consistency_filter) -> dict[str, StepRef]:
    """Stage A on its own (the pipeline flow runs the same steps in its own run)."""
    with pipeline_run(cfg, "instructions") as run:
        return stage_a(run, until)
