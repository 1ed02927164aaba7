"""``autoif``: run the pipeline, evaluate a model, list runs and steps in the store, show a step's output,
compare evaluation runs.

Heavy imports (prefect, mlflow, pandas) happen inside the commands, so ``autoif --help`` is instant.

``run`` and ``eval`` check what they need first (:mod:`autoif.preflight`: no Prefect, a second or two), show
progress while the flow runs (:mod:`autoif.progress`) and send Prefect's and MLflow's own logging to a log
file, ``.autoif/logs/<run>-<UTC time>.log``. A failure ends the command with one short message naming the
step and the file, line or field at fault, and the log file's path; the traceback is in the log file, and
on the terminal with ``--debug``. Exit codes: 1 a run failed, 2 bad input or config.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Iterator, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="AutoIF: instruction-following data by code verification.")

LOG_DIR = Path(".autoif/logs")
DEBUG_HELP = "show tracebacks and Prefect's logs on the terminal"
EVAL_PREFIXES = ("ifeval.", "ifbench.", "followbench.")


class PresetOption(str, Enum):
    code = "code"
    paper = "paper"


class BenchmarkChoice(str, Enum):
    ifeval = "ifeval"
    ifbench = "ifbench"
    followbench = "followbench"


class EngineChoice(str, Enum):
    openai = "openai"
    llamacpp = "llamacpp"
    vllm = "vllm"
    scripted = "scripted"


@app.callback()
def main(ctx: typer.Context, debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP)) -> None:
    ctx.obj = {"debug": debug}


def _debug(ctx: typer.Context, debug: bool) -> bool:
    """``--debug`` given to the command or to ``autoif`` itself."""
    return debug or bool((ctx.obj or {}).get("debug"))


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


# --- failures: one short message, the traceback in the log file ---------------------------------------------


def _log_path(run_name: str) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return LOG_DIR / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', run_name)}-{stamp}.log"


# errors of the user's input or config (exit 2), by the module that defines them (checked only when loaded)
_INPUT_ERRORS = (
    ("autoif.config", "ConfigError"),
    ("autoif.preflight", "PreflightError"),
    ("autoif.tasks.seeds", "SeedFileError"),
    ("autoif.tasks.cross_validation", "ProbeFileError"),
    ("autoif.evaluation.data", "EvalDataError"),
    ("autoif.llm.errors", "LLMSetupError"),
    ("autoif.runtime.recording", "ModelRunNotFound"),
)


def _loaded(module: str, name: str) -> type | None:
    return getattr(sys.modules[module], name, None) if module in sys.modules else None


def _cause(e: BaseException) -> BaseException:
    """What went wrong: a StepFailed's cause, else the error itself."""
    step_failed = _loaded("autoif.runtime.orchestration", "StepFailed")
    return e.cause if step_failed is not None and isinstance(e, step_failed) else e


def exit_code(e: BaseException) -> int:
    """2 for bad input or config (also when a step hit it), 1 for any other failure of a run."""
    cause = _cause(e)
    inputs = tuple(c for c in (_loaded(m, n) for m, n in _INPUT_ERRORS) if c is not None)
    return 2 if isinstance(cause, (FileNotFoundError, *inputs)) else 1


def error_message(e: BaseException) -> str:
    """The message of a failure: StepFailed names the step (and batch), preflight and config errors their key."""
    named = tuple(c for c in (_loaded("autoif.runtime.orchestration", "StepFailed"), _loaded("autoif.preflight", "PreflightError"),
                              _loaded("autoif.config", "ConfigError")) if c is not None)
    return str(e) if isinstance(e, named) else f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def _reported(log_path: Path, debug: bool) -> Iterator[None]:
    """Turn a failure into one short message on stderr (``--debug``: after the traceback), the traceback into
    the log file, and exit 1 or 2."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        typer.secho(f"interrupted; log: {log_path}", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    except Exception as e:  # noqa: BLE001  every failure is reported the same way
        text = "".join(traceback.format_exception(e))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"{dt.datetime.now(dt.timezone.utc).isoformat()} autoif failed:\n{text}")
        if debug:
            typer.echo(text, err=True)
        lines = error_message(e).splitlines() or [type(e).__name__]
        for i, line in enumerate(lines[:3]):
            typer.secho(f"error: {line}" if i == 0 else f"  {line.strip()}", fg=typer.colors.RED, err=True)
        more = f"; {len(lines) - 3} more lines there" if len(lines) > 3 else ""
        hint = "" if debug else " (--debug prints the traceback here)"
        typer.echo(f"log: {log_path}{more}{hint}", err=True)
        raise typer.Exit(exit_code(e)) from None


# Loggers of the libraries a flow runs on that print to the console (or do not propagate to the root).
_LIBRARY_LOGGERS = ("", "prefect", "prefect.flow_runs", "prefect.task_runs", "prefect._internal", "uvicorn", "fastapi",
                    "mlflow", "alembic", "sqlalchemy.engine", "huey", "distributed")
_MLFLOW_LOGGERS = ("mlflow", "alembic", "sqlalchemy.engine", "huey")  # given a stderr handler by `import mlflow`
# Without --debug: Prefect's console handler at CRITICAL (also in the Dask/Ray worker processes a run starts,
# which inherit the environment), and MLflow leaves its loggers to propagate (to the log file).
_QUIET_ENV = {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL", "MLFLOW_CONFIGURE_LOGGING": "false"}


def _is_console(logger: str, h: logging.Handler) -> bool:
    if not isinstance(h, logging.StreamHandler) or isinstance(h, logging.FileHandler):
        return False
    std = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return type(h).__module__.startswith("prefect.") or logger in _MLFLOW_LOGGERS or getattr(h, "stream", None) in std


class _LogFormatter(logging.Formatter):
    """Names the Prefect flow or task run a record comes from (``[verifier_synthesis[3]]``)."""

    def format(self, record: logging.LogRecord) -> str:
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        record.run = f" [{run}]" if run else ""
        return super().format(record)


@contextlib.contextmanager
def _library_logs(log_path: Path, debug: bool) -> Iterator[None]:
    """While the block runs, Prefect's, MLflow's and other libraries' log records (and warnings) go to
    ``log_path``, and, unless ``debug``, not to the console. Imports Prefect (whose import configures its
    logging); the environment, handlers and levels are put back afterwards."""
    env = {k: os.environ.get(k) for k in _QUIET_ENV}
    if not debug:
        for k, v in _QUIET_ENV.items():
            os.environ.setdefault(k, v)
    import prefect  # noqa: F401  configures Prefect's logging: the handlers below replace its console handler

    log_path.parent.mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(log_path, encoding="utf-8")
    file.setFormatter(_LogFormatter("%(asctime)s %(levelname)-7s %(name)s%(run)s - %(message)s"))
    saved = {}
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = list(logger.handlers)
        kept = logger.handlers if debug else [h for h in logger.handlers if not _is_console(name, h)]
        logger.handlers = kept + ([file] if name == "" or not logger.propagate else [])
    autoif_log = logging.getLogger("autoif")
    level = autoif_log.level
    autoif_log.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        autoif_log.setLevel(level)
        for name, handlers in saved.items():
            logging.getLogger(name).handlers = handlers
        file.close()
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- commands -----------------------------------------------------------------------------------------------


@app.command()
def run(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config"),
    preset: Optional[PresetOption] = typer.Option(None, "--preset", help="thresholds: code (published scripts) or paper"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set cross_validation.func_accuracy=0.5"),
    until: Optional[str] = typer.Option(None, "--until", help="stop after this step (e.g. self_instruct, exports: the data without training; default: evaluation)"),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Run the AutoIF pipeline (Prefect flow; outputs to the store; tracked in MLflow)."""
    cfg = _config(config, preset, set_)
    debug = _debug(ctx, debug)
    log_path = _log_path(cfg.run_name)
    from rich.console import Console

    console = Console()
    with _reported(log_path, debug):
        from autoif.preflight import check

        check(cfg, until)
        _embedded_defaults()
        console.print(f"autoif run {cfg.run_name} [{cfg.preset.value}] engine={cfg.engine.kind.value}"
                      f"{' until ' + until if until else ''}; log {log_path}", markup=False, highlight=False, soft_wrap=True)
        from autoif.progress import show_progress

        with _library_logs(log_path, debug), show_progress(console=console):
            from autoif.config import PipelineStep
            from autoif.flows.pipeline import run_pipeline

            refs = run_pipeline(cfg, until=PipelineStep(until) if until else PipelineStep.evaluation)
    from autoif.store import Store

    _print_funnel(console, Store.from_config(cfg.store), refs)
    _print_refs(console, refs)
    _print_training_data(console, Store.from_config(cfg.store), refs)
    if until is None or until == "evaluation":  # base vs SFT vs DPO vs online, as `autoif compare --pipeline`
        from mlflow import MlflowClient

        _print_pipeline_evaluations(MlflowClient(cfg.tracking.tracking_uri), cfg, cfg.run_name)


def _print_funnel(console, store, refs) -> None:
    """Every step: rows in, kept, the top drop reasons, the LLM tokens it used (from the manifests)."""
    from rich.table import Table

    from autoif.progress import human

    from autoif.runtime.recording import kept_instructions
    from autoif.tracking import Funnel, survival_line

    table = Table(title="funnel (rows of each step; instructions: distinct instructions its kept rows carry)")
    for col in ("step", "in", "kept", "top drop reasons", "llm tokens", "instructions"):
        table.add_column(col, justify="right" if col in ("in", "kept", "llm tokens", "instructions") else "left")
    funnels = []
    for name, ref in refs.items():
        m = store.manifest(ref.run, ref.step, ref.key)
        funnel = (m.meta.get("funnel") if m else None) or {}
        usage = (m.meta.get("usage") if m else None) or {}
        reasons = sorted((funnel.get("reasons") or {}).items(), key=lambda kv: -kv[1])[:3]
        tokens = usage.get("llm_prompt_tokens", 0) + usage.get("llm_completion_tokens", 0)
        n = kept_instructions(store, m) if m else None
        if funnel:
            funnels.append(Funnel(**{**funnel, "instructions": n}))
        table.add_row(name, str(funnel.get("rows_in", "")), str(funnel.get("rows_out", ref.rows)),
                      ", ".join(f"{r} {c}" for r, c in reasons) or "-", human(tokens) if usage else "-",
                      "-" if n is None else str(n))
    console.print(table)
    line = survival_line(funnels)
    if line:
        console.print(f"instructions surviving: {line}", markup=False, highlight=False, soft_wrap=True)


def _print_training_data(console, store, refs) -> None:
    """Where the SFT and DPO data are, and what they cost in LLM tokens (per kept SFT row and DPO pair)."""
    from autoif.progress import human
    from autoif.runtime.recording import training_data_cost

    if "sft" not in refs:
        return
    kept = {n: (store.manifest(r.run, r.step, r.key).meta.get("funnel") or {}).get("rows_out", 0) for n, r in refs.items()}
    console.print(f"SFT rows: {kept.get('sft', 0)}  ->  {refs['sft'].uri}", markup=False, highlight=False, soft_wrap=True)
    for name in ("query_dpo", "instruction_dpo"):
        if name in refs:
            console.print(f"DPO pairs ({name.split('_')[0]}-level): {kept.get(name, 0)}  ->  {refs[name].uri}",
                          markup=False, highlight=False, soft_wrap=True)
    for name in ("export_trl_sft", "export_trl_dpo", "export_llamafactory", "export_hf"):
        if name in refs:
            console.print(f"{name}: {refs[name].uri}", markup=False, highlight=False, soft_wrap=True)
    cost = training_data_cost(store, refs)
    line = f"LLM tokens: {human(cost['tokens_in'])} in, {human(cost['tokens_out'])} out"
    if "tokens_per_sft_row" in cost:
        line += f"; {human(cost['tokens_per_sft_row'])} per SFT row"
    if "tokens_per_dpo_pair" in cost:
        line += f"; {human(cost['tokens_per_dpo_pair'])} per DPO pair"
    console.print(line, markup=False, highlight=False)


def _print_refs(console, refs) -> None:
    from rich.table import Table

    table = Table(title="step outputs")
    for col in ("step", "rows", "uri"):
        table.add_column(col)
    for name, ref in refs.items():
        table.add_row(name, str(ref.rows), ref.uri)
    console.print(table)


@app.command("eval")
def eval_command(
    ctx: typer.Context,
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
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Evaluate a model (or a responses file) on IFEval, IFBench or FollowBench; results in MLflow."""
    overrides = list(set_)
    if engine is not None:
        overrides.append(f"engine.kind={engine.value}")
    for key, value in (("engine.model", model), ("engine.base_url", base_url), ("engine.model_path", model_path)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if data is not None:
        overrides.append(f"eval.{benchmark.value}_path={data}")
    cfg = _config(config, None, overrides)
    debug = _debug(ctx, debug)
    log_path = _log_path(f"{cfg.run_name}-eval-{benchmark.value}")
    from rich.console import Console

    console = Console()
    source = f"responses {responses}" if responses else f"engine {cfg.engine.kind.value}:{cfg.engine.model}"
    with _reported(log_path, debug):
        from autoif.preflight import check_eval

        check_eval(cfg, benchmark.value, responses)
        _embedded_defaults()
        console.print(f"autoif eval {benchmark.value} ({source}); log {log_path}", markup=False, highlight=False, soft_wrap=True)
        from autoif.progress import show_progress

        with _library_logs(log_path, debug), show_progress(console=console):
            from autoif.flows.evaluate import evaluate

            out = evaluate(cfg, benchmark=benchmark.value, responses_path=str(responses) if responses else None,
                           model_run_id=model_run, limit=limit)
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


def _print_pipeline_evaluations(client, cfg, pipeline: str | None, all_metrics: bool = False) -> None:
    """The policy evaluations of a pipeline run (``pipeline``: its autoif run_name, MLflow run name or id; None:
    the latest with evaluations) side by side, with the verifier pass rates it logged; exit 1 when none."""
    from mlflow.exceptions import MlflowException
    from rich.console import Console
    from rich.table import Table

    from autoif.flows.evaluate import HEADLINE, PipelineNotFound, pipeline_evaluations

    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    try:
        if exp is None:
            raise PipelineNotFound(f"no MLflow experiment {cfg.tracking.experiment!r}")
        found = pipeline_evaluations(client, exp.experiment_id, pipeline)
    except (PipelineNotFound, MlflowException) as e:
        typer.secho(f"{e} in {cfg.tracking.tracking_uri}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    p = found.pipeline
    if not found.evaluations:
        typer.secho(f"pipeline run {p.info.run_name} ({p.info.run_id}) has no policy evaluations", fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(1)
    evals, labels = found.evaluations, found.labels
    present = {k for r in evals for k in r.data.metrics}
    if all_metrics:
        names = sorted(k for k in present if k.startswith(EVAL_PREFIXES))
    else:
        names = [f"{b}.{k}" for b in ("ifeval", "ifbench") for k in (*HEADLINE, "n_prompts") if f"{b}.{k}" in present]
        names += sorted(k for k in present if k.startswith("followbench.") and k.split(".", 1)[1].startswith(("hsr", "ssr", "csl")))
    table = Table(title=f"pipeline {p.info.run_name} ({p.info.run_id[:8]}): evaluations")
    table.add_column("metric")
    for label, r in zip(labels, evals):
        table.add_column(f"{label}\n{r.info.run_id[:8]}", justify="right")
    for k in names:
        table.add_row(k, *[f"{r.data.metrics[k]:.4f}" if k in r.data.metrics else "-" for r in evals])
    own = {}  # label -> the pass rate of the samples it drew as an online policy (first iteration it sampled)
    for rate in found.pass_rates:
        if rate.policy is not None:
            own.setdefault(rate.policy, rate.value)
    if any(label in own for label in labels):
        table.add_row("verifier pass_rate (online samples)", *[f"{own[lb]:.4f}" if lb in own else "-" for lb in labels])
    console = Console(width=max(120, 44 + 14 * len(evals)))
    console.print(table)
    if found.pass_rates:
        rates = Table(title="verifier pass rates (pipeline run)")
        for col in ("responses", "sampled by", "mean pass_rate"):
            rates.add_column(col, justify="right" if col.startswith("mean") else "left")
        for rate in found.pass_rates:
            rates.add_row(rate.what, rate.policy or "-", f"{rate.value:.4f}")
        console.print(rates)


@app.command()
def compare(
    runs: Optional[list[str]] = typer.Argument(None, metavar="[RUN...]", show_default=False,
                                               help="MLflow run ids (or run names) to put side by side"),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", "-p", metavar="RUN_NAME",
                                           help="a pipeline run (autoif run_name, MLflow run name or id): its evaluations "
                                                "of base, SFT, DPO and online models side by side (default, without RUN)"),
    all_metrics: bool = typer.Option(False, "--all", help="show every metric, not only the evaluation ones"),
    config: Optional[Path] = typer.Option(None, "--config", "-c"),
    set_: list[str] = typer.Option([], "--set"),
) -> None:
    """Print the evaluation metrics of MLflow runs side by side: the runs named, or a pipeline's evaluations
    of base vs SFT vs DPO vs online (``--pipeline``, or no RUN: the latest pipeline run), with its verifier
    pass rates."""
    cfg = _config(config, None, set_)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from rich.console import Console
    from rich.table import Table

    client = MlflowClient(cfg.tracking.tracking_uri)
    if runs and pipeline is not None:
        typer.secho("give RUN ids/names or --pipeline, not both", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    if not runs:
        _print_pipeline_evaluations(client, cfg, pipeline, all_metrics)
        return
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


@app.command()
def deploy(
    prefect_file: Path = typer.Option(Path("deployments/prefect.yaml"), "--prefect-file", help="the deployments (prefect.yaml)"),
    name: list[str] = typer.Option([], "--name", help="only this deployment (repeatable; default: all)"),
) -> None:
    """Register the Prefect deployments on the server PREFECT_API_URL names, creating their work pools when
    missing (= prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml); run from the repo root."""
    from autoif.deploy import DeployError, register

    try:
        created = register(prefect_file, name or None)
    except DeployError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(f"work pools created: {', '.join(created)}" if created else "work pools: all existed")
    typer.echo("start a worker: AUTOIF_HOME=$PWD prefect worker start --pool autoif")


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


@app.command()
def datasets(
    run_name: Optional[str] = typer.Option(None, "--run", help="only this run"),
    config: Optional[Path] = typer.Option(None, "--config", "-c"),
    set_: list[str] = typer.Option([], "--set"),
) -> None:
    """List the exported datasets (TRL, LLaMA-Factory, Hugging Face) in the store: every version of every run."""
    from rich.console import Console
    from rich.table import Table

    from autoif.store import Store

    cfg = _config(config, None, set_)
    store = Store.from_config(cfg.store)
    table = Table(title=f"exported datasets in {cfg.store.root}")
    for col in ("run", "export", "key", "rows", "digest", "created", "from (upstream)", "files"):
        table.add_column(col, justify="right" if col == "rows" else "left", overflow="fold",
                         no_wrap=col in ("key", "rows", "digest"))
    for name in [run_name] if run_name else store.runs():
        for m in store.manifests(name):
            if not m.step.startswith("export_"):
                continue
            root = m.uri.rsplit("/", 3)[0] + "/"  # <root>/<run>/<step>/<key>: upstream shown as <run>/<step>/<key>
            upstream = "\n".join(u.removeprefix(root) for u in m.upstream) or "-"
            table.add_row(name, m.step, m.key, str(m.rows), m.digest[:12], m.created_at[:19].replace("T", " "), upstream,
                          "\n".join(sorted(m.files_extra)) or "-")
    console = Console()
    console.print(table)
    if not table.row_count:
        console.print("no exports yet: `autoif run --until exports` makes them", markup=False, highlight=False)
