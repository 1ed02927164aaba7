"""Stage A: instructions and verification functions (AutoIF steps 1-4)."""
from __future__ import annotations

from prefect import flow

from autoif.config import RunConfig
from autoif.steps import pipeline
from autoif.store import StepRef
from autoif.tasks.instructions import load_seeds, self_instruct


@flow(name="autoif-instructions", flow_run_name="{cfg.run_name}-instructions", log_prints=True)
def build_instructions(cfg: RunConfig) -> dict[str, StepRef]:
    with pipeline(cfg, "instructions"):
        seeds = load_seeds()
        instructions = self_instruct(seeds=seeds)
        return {"seeds": seeds, "self_instruct": instructions}
