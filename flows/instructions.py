"""Stage A: instructions and verification functions (AutoIF steps 1-4)."""
from __future__ import annotations

from enum import Enum

from prefect import flow

from autoif.config import RunConfig
from autoif.steps import log_survival, pipeline
from autoif.store import StepRef
from autoif.tasks.instructions import load_seeds, self_instruct
from autoif.tasks.verifiers import back_translate, consistency_filter, cross_validate, synthesize_verifiers

class StageAStep(str, Enum):
    """Where stage A may stop (``--until``)."""

    self_instruct = "self_instruct"
    verifier_synthesis = "verifier_synthesis"
    cross_validation = "cross_validation"
    back_translation = "back_translation"
    consistency_filter = "consistency_filter"


@flow(name="autoif-instructions", flow_run_name="{cfg.run_name}-instructions", log_prints=True)
def build_instructions(cfg: RunConfig, until: StageAStep = StageAStep.consistency_filter) -> dict[str, StepRef]:
    """Seeds -> self-instruct -> verifier synthesis -> cross-validation -> back-translation -> consistency
    filter; ``until`` stops after the named step."""
    with pipeline(cfg, "instructions"):
        refs = {"seeds": load_seeds()}
        refs["self_instruct"] = self_instruct(seeds=refs["seeds"])  # 1. seeds + self-instruct, deduplicated
        if until != "self_instruct":
            refs["verifier_synthesis"] = synthesize_verifiers(instructions=refs["self_instruct"])  # 2. K functions + cases
        if until not in ("self_instruct", "verifier_synthesis"):
            refs["cross_validation"] = cross_validate(candidates=refs["verifier_synthesis"])  # 3. on the sandbox
        if until in ("back_translation", "consistency_filter"):
            refs["back_translation"] = back_translate(validated=refs["cross_validation"])  # 4. functions -> text
        if until == "consistency_filter":
            refs["consistency_filter"] = consistency_filter(translated=refs["back_translation"])  # 4. NLI / judge
            log_survival(refs["self_instruct"], refs["consistency_filter"])  # per seed family, whole stage
        return refs
