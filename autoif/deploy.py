"""Deployments: the entry flows ``deployments/prefect.yaml`` points at, and :func:`register` (``autoif deploy``).

A deployment passes JSON parameters, not a :class:`~autoif.config.RunConfig`: each entry flow here takes what a
deployment can pass (a config file, a preset, ``key.path=value`` overrides, a run-name template), loads the
config and calls the flow it stands for, which runs as its subflow on the task runner ``runtime`` names. The
weekly deployment of the whole pipeline uses ``flows/pipeline.py:scheduled_pipeline``; :func:`pipeline` is
the same for on-demand runs (both take ``until``; default: through the evaluation).

Registering is Prefect's own ``prefect deploy``; :func:`register` first creates the work pools the file
names when they are missing. By hand, from the repository root, with ``PREFECT_API_URL`` set:

    prefect work-pool create autoif --type process
    prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml   # with AUTOIF_HOME unset
    AUTOIF_HOME=$PWD prefect worker start --pool autoif   # the pull step's working directory
"""
from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow

from autoif.config import ConfigError, EngineConfig, PipelineStep, RunConfig, load_config
from autoif.store import StepRef

PREFECT_FILE = Path("deployments/prefect.yaml")


class DeployError(RuntimeError):
    """Deployments cannot be registered (no Prefect server configured, a bad prefect.yaml, prefect deploy failed)."""


def deployed_config(config_path: str | None, preset: str | None, overrides: list[str] | None,
                    run_name_template: str) -> RunConfig:
    """The run config of a deployment's parameters: file -> preset -> overrides, then the run named by
    ``run_name_template`` (``{run_name}`` from the config, ``{date}`` today: a dated name makes fresh data, the
    plain name continues a run from the cache)."""
    cfg = load_config(config_path, preset, overrides or [])
    try:
        name = run_name_template.format(run_name=cfg.run_name, date=dt.date.today().isoformat())
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"run_name_template {run_name_template!r}: only {{run_name}} and {{date}} may appear ({e})") from None
    return cfg.model_copy(update={"run_name": name})


def _shown(cfg: RunConfig, flow_name: str, refs: dict[str, StepRef]) -> dict[str, StepRef]:
    """The subflow's whole funnel also on this (top-level) flow run's page."""
    from autoif.runtime.recording import funnel_artifact_of

    funnel_artifact_of(cfg, refs, flow_name)
    return refs


def _on_runner(f, cfg: RunConfig):
    """A flow on the task runner ``cfg.runtime`` names (threads, a Dask or a Ray cluster)."""
    from autoif.runtime import task_runner

    return f.with_options(task_runner=task_runner(cfg.runtime))


# --- the entry flows (deployments/prefect.yaml) -----------------------------------------------------------


@flow(name="autoif-deploy-pipeline", log_prints=True)
def pipeline(config_path: str | None = None, preset: str | None = None, overrides: list[str] | None = None,
             run_name_template: str = "{run_name}-{date}", until: PipelineStep = PipelineStep.evaluation) -> dict[str, StepRef]:
    """The whole pipeline (``autoif-pipeline``), stopping after ``until``."""
    from autoif.flows.pipeline import run_pipeline

    cfg = deployed_config(config_path, preset, overrides, run_name_template)
    return _shown(cfg, "deployment", run_pipeline(cfg, until=until))


@flow(name="autoif-deploy-instructions", log_prints=True)
def instructions(config_path: str | None = None, preset: str | None = None, overrides: list[str] | None = None,
                 run_name_template: str = "{run_name}",
                 until: PipelineStep = PipelineStep.consistency_filter) -> dict[str, StepRef]:
    """Stage A (``autoif-instructions``): instructions and their verification functions."""
    from autoif.flows.instructions import build_instructions

    cfg = deployed_config(config_path, preset, overrides, run_name_template)
    return _shown(cfg, "deployment", _on_runner(build_instructions, cfg)(cfg, until=until))


@flow(name="autoif-deploy-data", log_prints=True)
def data(config_path: str | None = None, preset: str | None = None, overrides: list[str] | None = None,
         run_name_template: str = "{run_name}", until: PipelineStep = PipelineStep.exports) -> dict[str, StepRef]:
    """Stage B (``autoif-data``): the training data; stage A's finished steps of the same run from the cache."""
    from autoif.flows.data import build_data

    cfg = deployed_config(config_path, preset, overrides, run_name_template)
    return _shown(cfg, "deployment", _on_runner(build_data, cfg)(cfg, until=until))


@flow(name="autoif-deploy-train", log_prints=True)
def train(config_path: str | None = None, preset: str | None = None, overrides: list[str] | None = None,
          run_name_template: str = "{run_name}", until: PipelineStep = PipelineStep.evaluation) -> dict[str, StepRef]:
    """Stage C (``autoif-train``): SFT, DPO, online iterations and their evaluation on the run's data."""
    from autoif.flows.training import build_models

    cfg = deployed_config(config_path, preset, overrides, run_name_template)
    return _shown(cfg, "deployment", _on_runner(build_models, cfg)(cfg, until=until))


@flow(name="autoif-deploy-evaluate", log_prints=True)
def evaluation(config_path: str | None = None, preset: str | None = None, overrides: list[str] | None = None,
               run_name_template: str = "{run_name}", benchmark: str = "ifeval", responses_path: str | None = None,
               model_run_id: str | None = None, limit: int | None = None, judge: EngineConfig | None = None) -> dict[str, Any]:
    """One evaluation (``autoif-evaluate``) of the configured engine's model, or of a responses file."""
    from autoif.flows.evaluate import evaluate

    cfg = deployed_config(config_path, preset, overrides, run_name_template)
    return _on_runner(evaluate, cfg)(cfg, benchmark=benchmark, responses_path=responses_path, model_run_id=model_run_id,
                                     limit=limit, judge=judge)


# --- registering them ---------------------------------------------------------------------------------------


def work_pools(prefect_file: Path) -> dict[str, str]:
    """The work pools a prefect.yaml's deployments name: pool name -> type (``work_pool.type``, default process)."""
    import yaml

    try:
        doc = yaml.safe_load(prefect_file.read_text()) or {}
    except FileNotFoundError:
        raise DeployError(f"no prefect file at {prefect_file} (run from the repository root or pass --prefect-file)") from None
    except yaml.YAMLError as e:
        raise DeployError(f"{prefect_file}: not valid YAML: {e}") from None
    pools: dict[str, str] = {}
    for i, d in enumerate(doc.get("deployments") or []):
        pool = (d or {}).get("work_pool") or {}
        if not pool.get("name"):
            raise DeployError(f"{prefect_file}: deployment {i} ({(d or {}).get('name')!r}) names no work_pool.name")
        pools[pool["name"]] = pool.get("type", "process")
    return pools


async def ensure_work_pool(name: str, kind: str = "process") -> bool:
    """Create work pool ``name`` (with the worker type's default job template) unless it exists; True if created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    async with get_client() as client:
        try:
            await client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        template = await get_default_base_job_template_for_infrastructure_type(kind)
        if template is None:
            raise DeployError(f"work pool {name!r}: unknown worker type {kind!r} (is its Prefect integration installed?)")
        await client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=template))
        return True


def deploy_command(prefect_file: Path, names: list[str] | None = None) -> list[str]:
    """The ``prefect deploy`` line that registers the file's deployments (all, or only ``names``)."""
    which = [a for n in names for a in ("--name", n)] if names else ["--all"]
    return [sys.executable, "-m", "prefect", "--no-prompt", "deploy", *which, "--prefect-file", str(prefect_file)]


def register(prefect_file: Path = PREFECT_FILE, names: list[str] | None = None, cwd: Path | None = None) -> list[str]:
    """Create the file's work pools when missing, then register its deployments with ``prefect deploy`` on the
    configured Prefect API (entrypoints resolve from ``cwd``, the repository root); the pull step's
    ``$AUTOIF_HOME`` is left for the worker. Returns the pools created."""
    import asyncio

    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise DeployError("PREFECT_API_URL is not set: deployments live on a Prefect server "
                          "(prefect server start; export PREFECT_API_URL=http://127.0.0.1:4200/api)")
    created = [name for name, kind in work_pools(prefect_file).items() if asyncio.run(ensure_work_pool(name, kind))]
    # `prefect deploy` fills in `{{ $VAR }}` from its own environment when VAR is set there: without AUTOIF_HOME
    # the pull step keeps the placeholder, and each worker resolves it to its own checkout at run time
    env = {k: v for k, v in os.environ.items() if k != "AUTOIF_HOME"}
    done = subprocess.run(deploy_command(prefect_file, names), cwd=cwd, env=env)
    if done.returncode != 0:
        raise DeployError(f"prefect deploy exited with {done.returncode} (its output is above)")
    return created
