"""The whole AutoIF pipeline: the main job ``autoif run`` starts."""
from __future__ import annotations

from prefect import flow

from autoif.config import RunConfig
from autoif.flows.instructions import build_instructions
from autoif.store import StepRef


@flow(name="autoif-pipeline", flow_run_name="{cfg.run_name}", log_prints=True)
def autoif_pipeline(cfg: RunConfig, flow: str = "all") -> dict[str, StepRef]:
    """Stage A (instructions, verifiers); stages B and C join as they land."""
    refs: dict[str, StepRef] = {}
    refs.update(build_instructions(cfg))
    return refs
