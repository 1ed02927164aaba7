"""Secure, fast executor for generated verification functions (``def evaluate(response) -> bool``).

>>> with Sandbox(timeout_s=1.0) as sb:
...     results = sb.run([src_a, src_b], responses)          # full matrix, row-major
...     results = sb.run(funcs, responses, pairs=[(0, 3), (1, 2)])

Outcomes: :class:`Outcome`. Isolation modes: :class:`Isolation` (see ``core.py`` for what each
layer does). Inside Prefect tasks use :func:`shared_sandbox` so the pool starts once per process.
"""
from .core import (
    DEFAULT_ALLOWED_MODULES,
    CallResult,
    Isolation,
    Outcome,
    Sandbox,
    SandboxError,
    close_shared_sandbox,
    shared_sandbox,
)

__all__ = [
    "DEFAULT_ALLOWED_MODULES",
    "CallResult",
    "Isolation",
    "Outcome",
    "Sandbox",
    "SandboxError",
    "close_shared_sandbox",
    "shared_sandbox",
]
