"""AutoIF steps as pure functions of frames, wrapped into cached, retryable Prefect tasks by
:func:`autoif.steps.step` (installed as ``autoif.tasks``)."""
