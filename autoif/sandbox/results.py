"""What :meth:`Sandbox.run` hands back (one :class:`CallResult` per call) or raises (:class:`SandboxError`)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from . import protocol


class Outcome(str, Enum):
    passed = "pass"
    failed = "fail"
    error = "error"
    timeout = "timeout"
    killed = "killed"
    invalid_return = "invalid_return"
    compile_error = "compile_error"


# the outcome of each code on the wire
OUTCOME_OF_CODE = {
    protocol.PASS: Outcome.passed,
    protocol.FAIL: Outcome.failed,
    protocol.ERROR: Outcome.error,
    protocol.INVALID: Outcome.invalid_return,
    protocol.COMPILE: Outcome.compile_error,
}


@dataclass(frozen=True)
class CallResult:
    func_index: int
    input_index: int
    outcome: Outcome
    detail: str = ""

    @property
    def value(self) -> bool | None:
        if self.outcome is Outcome.passed:
            return True
        if self.outcome is Outcome.failed:
            return False
        return None


class SandboxError(RuntimeError):
    """The sandbox cannot do what was asked (closed, a requested isolation mode unavailable...)."""
