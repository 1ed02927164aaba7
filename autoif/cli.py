"""``autoif``: run the pipeline, list runs and steps in the store, show a step's output.

Heavy imports (prefect, mlflow, pandas) happen inside the commands, so ``autoif --help`` is instant.
"""
from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="AutoIF: instruction-following data by code verification.")


class PresetOption(str, Enum):
    code = "code"
    paper = "paper"


def _config(config: Optional[Path], preset: Optional[PresetOption], overrides: list[str]):
    from autoif.config import ConfigError, load_config

    try:
        return load_config(config, preset.value if preset else None, overrides)
    except ConfigError as e:
        typer.secho(str(e), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _embedded_defaults() -> None:
    """The embedded default: ephemeral Prefect with state under .autoif/, quiet telemetry."""
    home = Path(os.environ.setdefault("PREFECT_HOME", str(Path(".autoif/prefect").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config"),
    preset: Optional[PresetOption] = typer.Option(None, "--preset", help="thresholds: code (published scripts) or paper"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set cross_validation.func_accuracy=0.5"),
    until: Optional[str] = typer.Option(None, "--until", help="stop after this step (e.g. self_instruct, cross_validation)"),
) -> None:
    """Run the AutoIF pipeline (Prefect flow; outputs to the store; tracked in MLflow)."""
    cfg = _config(config, preset, set_)
    _embedded_defaults()
    from rich.console import Console

    from autoif.flows.instructions import StageAStep
    from autoif.flows.pipeline import autoif_pipeline

    try:
        last = StageAStep(until) if until else StageAStep.consistency_filter
    except ValueError:
        typer.secho(f"--until: unknown step {until!r}; one of {', '.join(s.value for s in StageAStep)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    console = Console()
    with console.status(f"running AutoIF [{cfg.preset.value}] run={cfg.run_name} engine={cfg.engine.kind.value}"):
        refs = autoif_pipeline(cfg, until=last)
    _print_refs(console, refs)


def _print_refs(console, refs) -> None:
    from rich.table import Table

    table = Table(title="step outputs")
    for col in ("step", "rows", "uri"):
        table.add_column(col)
    for name, ref in refs.items():
        table.add_row(name, str(ref.rows), ref.uri)
    console.print(table)


@app.command()
def runs(
    config: Optional[Path] = typer.Option(None, "--config", "-c"),
    set_: list[str] = typer.Option([], "--set"),
) -> None:
    """List runs in the store and their completed steps with row counts."""
    from rich.console import Console
    from rich.table import Table

    from autoif.store import Store

    cfg = _config(config, None, set_)
    store = Store.from_config(cfg.store)
    table = Table(title=f"runs in {cfg.store.root}")
    for col in ("run", "step", "key", "rows", "kept", "created"):
        table.add_column(col)
    for run_name in store.runs():
        for m in store.manifests(run_name):
            kept = m.meta.get("funnel", {}).get("rows_out", "")
            table.add_row(run_name, m.step, m.key, str(m.rows), str(kept), m.created_at[:19])
    Console().print(table)


@app.command()
def show(
    run_name: str = typer.Argument(..., metavar="RUN"),
    step: str = typer.Argument(..., metavar="STEP"),
    n: int = typer.Option(10, "-n", help="rows to show"),
    dropped: bool = typer.Option(False, "--dropped", help="show only dropped rows"),
    config: Optional[Path] = typer.Option(None, "--config", "-c"),
    set_: list[str] = typer.Option([], "--set"),
) -> None:
    """Show the head of a step's output (its newest version in RUN)."""
    import pandas as pd
    from rich.console import Console

    from autoif.store import Store

    cfg = _config(config, None, set_)
    store = Store.from_config(cfg.store)
    found = [m for m in store.manifests(run_name) if m.step == step]
    if not found:
        typer.secho(f"no completed step {step!r} in run {run_name!r} under {cfg.store.root}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    df, uri = store.read_step(found[-1])
    if dropped and "reason" in df:
        df = df[df["reason"].notna()]
    console = Console()
    console.print(f"[bold]{uri}[/bold]  rows={len(df)}")
    with pd.option_context("display.max_colwidth", 60, "display.width", 250, "display.max_columns", 50):
        typer.echo(df.head(n).to_string())


# Further command groups register here (evaluation, training) without importing their heavy modules.
from autoif.evaluation.cli import register as _register_evaluation  # noqa: E402  (light: typer only)

_register_evaluation(app)
