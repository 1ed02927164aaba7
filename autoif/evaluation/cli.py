"""``autoif eval`` and ``autoif compare``: the evaluation flow on its own, and runs side by side.

Registered into ``autoif.cli.app`` by :func:`register`; heavy modules are imported inside the commands.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

EVAL_PREFIXES = ("ifeval.", "ifbench.", "followbench.")


class BenchmarkChoice(str, Enum):
    ifeval = "ifeval"
    ifbench = "ifbench"
    followbench = "followbench"


class EngineChoice(str, Enum):
    openai = "openai"
    llamacpp = "llamacpp"
    vllm = "vllm"
    scripted = "scripted"


def eval_command(
    benchmark: BenchmarkChoice = typer.Option(BenchmarkChoice.ifeval, "--benchmark", "-b", help="ifeval | ifbench | followbench"),
    responses: Optional[Path] = typer.Option(None, "--responses", help='score a JSONL of {"prompt", "response"} instead of generating'),
    engine: Optional[EngineChoice] = typer.Option(None, "--engine", help="engine that answers (default: the config's)"),
    model: Optional[str] = typer.Option(None, "--model", help="model name (OpenAI server) or label"),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1"),
    model_path: Optional[str] = typer.Option(None, "--model-path", help="GGUF file (llamacpp) or model dir (vllm)"),
    model_run: Optional[str] = typer.Option(None, "--model-run", help="MLflow run id of the model evaluated (linked by tag)"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="first N items only (smoke runs)"),
    data: Optional[Path] = typer.Option(None, "--data", help="benchmark file/folder (default: the shipped copy)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set eval.max_tokens=512"),
) -> None:
    """Evaluate a model (or a responses file) on IFEval, IFBench or FollowBench; results in MLflow."""
    from autoif.cli import _config, _embedded_defaults

    overrides = list(set_)
    if engine is not None:
        overrides.append(f"engine.kind={engine.value}")
    for key, value in (("engine.model", model), ("engine.base_url", base_url), ("engine.model_path", model_path)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if data is not None:
        overrides.append(f"eval.{benchmark.value}_path={data}")
    cfg = _config(config, None, overrides)
    _embedded_defaults()

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from autoif.evaluation.data import EvalDataError
    from autoif.flows.evaluate import evaluate
    from autoif.tasks.evaluate import set_progress_hook

    console = Console()
    source = f"responses {responses}" if responses else f"engine {cfg.engine.kind.value}:{cfg.engine.model}"
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        bars: dict[str, int] = {}

        def hook(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = progress.add_task(f"{benchmark.value}: {stage}", total=total)
            progress.update(bars[stage], completed=done, total=total)

        set_progress_hook(hook)
        try:
            out = evaluate(cfg, benchmark=benchmark.value, responses_path=str(responses) if responses else None,
                           model_run_id=model_run, limit=limit)
        except (EvalDataError, FileNotFoundError) as e:
            console.print(f"[red]{e}[/red]")
            raise typer.Exit(2) from None
        finally:
            set_progress_hook(None)
    _print_metrics(console, f"{benchmark.value} ({source})", out["metrics"])
    console.print(f"MLflow run: {out['mlflow_run_id']}  scores: {out['scores'].uri}")


def _print_metrics(console, title: str, metrics: dict[str, float]) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}" if not float(v).is_integer() or v < 1.5 else f"{int(v)}")
    console.print(table)


def compare_command(
    runs: list[str] = typer.Argument(..., metavar="RUN...", help="MLflow run ids (or run names) to put side by side"),
    all_metrics: bool = typer.Option(False, "--all", help="show every metric, not only the evaluation ones"),
    config: Optional[Path] = typer.Option(None, "--config", "-c"),
    set_: list[str] = typer.Option([], "--set"),
) -> None:
    """Print the evaluation metrics of MLflow runs side by side (e.g. base vs SFT vs DPO)."""
    from autoif.cli import _config

    cfg = _config(config, None, set_)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from rich.console import Console
    from rich.table import Table

    client = MlflowClient(cfg.tracking.tracking_uri)
    found = []
    for ref in runs:
        try:
            found.append(client.get_run(ref))
            continue
        except MlflowException:
            pass
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        hits = client.search_runs([exp.experiment_id], f"attributes.run_name = '{ref}'", order_by=["start_time DESC"],
                                  max_results=1) if exp else []
        if not hits:
            typer.secho(f"no MLflow run {ref!r} (id or name) in {cfg.tracking.tracking_uri}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1)
        found.append(hits[0])
    names = sorted({k for r in found for k in r.data.metrics if all_metrics or k.startswith(EVAL_PREFIXES)})
    table = Table(title="evaluation runs")
    table.add_column("metric")
    for r in found:
        label = r.data.tags.get("autoif.eval.model") or r.info.run_name
        table.add_column(f"{r.info.run_name}\n{label}\n{r.info.run_id[:8]}", justify="right")
    for k in names:
        table.add_row(k, *[f"{r.data.metrics[k]:.4f}" if k in r.data.metrics else "-" for r in found])
    Console(width=max(120, 40 + 26 * len(found))).print(table)


def register(app: typer.Typer) -> None:
    """Add ``eval`` and ``compare`` to the ``autoif`` CLI."""
    app.command("eval")(eval_command)
    app.command("compare")(compare_command)


def eval_app_for_tests() -> typer.Typer:
    """A typer app holding only these commands (tests; the real CLI is ``autoif.cli.app``)."""
    app = typer.Typer(add_completion=False)
    register(app)
    return app
