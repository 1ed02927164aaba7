"""The step runtime: plain task functions become cached, retryable Prefect task runs that write versioned
Parquet, run on the flow's task runner (threads, Dask, Ray) and report to MLflow from the flow.

- :mod:`~autoif.runtime.spec`: :class:`StepSpec`, a step as data (its function, contract, config, key);
- :mod:`~autoif.runtime.execute`: what a task run does where it runs (no Prefect, no MLflow);
- :mod:`~autoif.runtime.resources`: per-process engine, sandbox and NLI model, keyed by their config;
- :mod:`~autoif.runtime.orchestration`: :class:`Step` (the Prefect tasks, batch submission) and task runners;
- :mod:`~autoif.runtime.recording`: :class:`PipelineRun` and the run's side effects (MLflow, artifacts).

Importing this package loads neither Prefect nor MLflow; using a :class:`Step` in a flow does.
"""
from autoif.runtime.orchestration import Step, StepFailed, task_runner
from autoif.runtime.spec import StepSpec

__all__ = ["Step", "StepFailed", "StepSpec", "task_runner"]
