"""Progress of long work: a logging handler for the ``autoif.progress`` events the step runtime emits
(:func:`autoif.runtime.orchestration.emit`: ``step_start``, ``batch_done``, ``step_done``).

- On a terminal: one live line (rich) with the current step, batch i of n, rows kept, LLM requests and tokens
  so far with a rate, sandbox calls and an ETA; between batch events the LLM counters of this process's
  engines (:func:`autoif.runtime.resources.built_engines`) are polled twice a second, so a long batch still
  shows its requests moving. Each finished step stays on screen as one line.
- Elsewhere (a pipe, CI, a log file): one plain line per finished batch and per finished step::

      verifier_synthesis [3/8] 24 rows, 20 kept | llm 96 req, 41.2k tok (310 tok/s) | sandbox 0 | eta 1m40s
      cross_validation done: 8 in, 5 kept | 12s

Counts on a batch line are the step's totals so far. ``autoif run`` and ``autoif eval`` install the handler
around the flow call with :func:`show_progress`.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

LOGGER = "autoif.progress"
POLL_S = 0.5  # how often the live display reads the engines' counters


@dataclass(frozen=True)
class LLMCount:
    """LLM requests and tokens (prompt + completion)."""

    requests: int = 0
    tokens: int = 0

    @classmethod
    def of_usage(cls, usage: dict[str, Any] | None) -> "LLMCount":
        """From a batch's usage metrics (``llm_requests``, ``llm_prompt_tokens``, ``llm_completion_tokens``)."""
        u = usage or {}
        return cls(int(u.get("llm_requests", 0)), int(u.get("llm_prompt_tokens", 0)) + int(u.get("llm_completion_tokens", 0)))

    def __add__(self, other: "LLMCount") -> "LLMCount":
        return LLMCount(self.requests + other.requests, self.tokens + other.tokens)

    def __sub__(self, other: "LLMCount") -> "LLMCount":
        return LLMCount(self.requests - other.requests, self.tokens - other.tokens)

    def most(self, other: "LLMCount") -> "LLMCount":
        return LLMCount(max(self.requests, other.requests), max(self.tokens, other.tokens))


def engines_count() -> LLMCount:
    """What this process's engines have done so far (engines on Dask/Ray workers are not seen here)."""
    from autoif.runtime.resources import built_engines

    total = LLMCount()
    for engine in built_engines():
        u = getattr(engine, "usage", None)
        if u is not None:
            total = total + LLMCount(u.requests, u.prompt_tokens + u.completion_tokens)
    return total


@dataclass
class StepState:
    """One step as the display knows it: its batch events summed."""

    step: str
    started: float
    engines_at_start: LLMCount = field(default_factory=LLMCount)
    batches: int | None = None
    done: int = 0
    rows: int = 0
    kept: int = 0
    reused: int = 0
    llm: LLMCount = field(default_factory=LLMCount)
    sandbox_calls: int = 0

    def add_batch(self, event: dict[str, Any]) -> None:
        self.batches = event.get("batches")
        self.done = int(event.get("done") or self.done + 1)
        self.rows += int(event.get("rows") or 0)
        self.kept += int(event.get("kept") or 0)
        self.reused += bool(event.get("reused"))
        self.llm = self.llm + LLMCount.of_usage(event.get("usage"))
        self.sandbox_calls += int(event.get("sandbox_calls") or 0)

    def eta(self, now: float) -> float | None:
        """Seconds left, from the batches done so far (None while the total or a first batch is unknown)."""
        if not self.batches or not self.done:
            return None
        return (now - self.started) / self.done * max(self.batches - self.done, 0)


# --- text -------------------------------------------------------------------------------------------------


def human(n: float) -> str:
    """41234 -> '41.2k', 1_500_000 -> '1.5M', 950 -> '950'."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.1f}{suffix}"
    return f"{n:.0f}" if n == int(n) or abs(n) >= 10 else f"{n:.1f}"


def duration(seconds: float) -> str:
    """100 -> '1m40s', 3725 -> '1h02m', 4.2 -> '4s'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def llm_text(llm: LLMCount, seconds: float) -> str:
    rate = ""
    if seconds > 0 and llm.tokens:
        rate = f" ({human(llm.tokens / seconds)} tok/s)"
    elif seconds > 0 and llm.requests:
        rate = f" ({human(llm.requests / seconds)} req/s)"
    return f"llm {llm.requests} req, {human(llm.tokens)} tok{rate}"


def batch_line(state: StepState, now: float, llm: LLMCount | None = None) -> str:
    """``step [i/n] rows, kept | llm ... | sandbox ... | eta ...`` (``llm``: a fresher count than the events')."""
    where = f"[{state.done}/{state.batches}]" if state.batches else f"[{state.done}]"
    reused = f", {state.reused} reused" if state.reused else ""
    parts = [f"{state.step} {where} {state.rows} rows, {state.kept} kept{reused}",
             llm_text(llm or state.llm, now - state.started), f"sandbox {state.sandbox_calls}"]
    eta = state.eta(now)
    if eta is not None:
        parts.append(f"eta {duration(eta)}")
    return " | ".join(parts)


def step_line(event: dict[str, Any], seconds: float | None = None) -> str:
    """``step done: N in, M kept`` (plus ``(reused)`` or how long it took)."""
    line = f"{event['step']} done: {event.get('rows_in', 0)} in, {event.get('kept', 0)} kept"
    if event.get("reused"):
        return line + " (reused)"
    return line if seconds is None else f"{line} | {duration(seconds)}"


# --- the handler ------------------------------------------------------------------------------------------


class ProgressHandler(logging.Handler):
    """Renders ``autoif.progress`` records: live on a terminal, else plain lines through ``write``."""

    def __init__(
        self,
        live: bool,
        console: Any = None,
        write: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        engines: Callable[[], LLMCount] = engines_count,
    ) -> None:
        super().__init__(logging.INFO)
        self.live, self.console, self.clock, self.engines = live, console, clock, engines
        self.write = write or _stdout_line
        self.current: StepState | None = None
        self._lock = threading.Lock()
        self._live: Any = None

    # logging.Handler
    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "progress", None)
        if not isinstance(event, dict):
            return
        try:
            with self._lock:  # output happens outside the lock: the live display's refresh takes it too
                line = self._update(event)
            if line is None:
                return
            if self._live is not None:
                self._live.console.print(f"[green]✓[/green] {line}", highlight=False)
            else:
                self.write(line)
        except Exception:  # noqa: BLE001  a display fault must never fail the run
            self.handleError(record)

    def _update(self, event: dict[str, Any]) -> str | None:
        """Fold one event into the state; the line to print for it, if any."""
        kind = event.get("event")
        if kind == "step_start":
            self.current = StepState(event["step"], self.clock(), engines_at_start=self._engines_now())
        elif kind == "batch_done":
            state = self._state(event["step"])
            state.add_batch(event)
            return None if self.live else batch_line(state, self.clock())
        elif kind == "step_done":
            state = self._state(event["step"])
            self.current = None
            return step_line(event, self.clock() - state.started)
        return None

    def _state(self, step: str) -> StepState:
        if self.current is None or self.current.step != step:
            self.current = StepState(step, self.clock(), engines_at_start=self._engines_now())
        return self.current

    def _engines_now(self) -> LLMCount:
        try:
            return self.engines()
        except Exception:  # noqa: BLE001  counters are a nicety
            return LLMCount()

    # the live display
    def start(self) -> None:
        if not self.live:
            return
        from rich.live import Live

        self._live = Live(console=self.console, get_renderable=self.render, refresh_per_second=1 / POLL_S, transient=True)
        self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def render(self):
        """The live line: spinner, step, bar of batches, then the batch line's counts (engines polled)."""
        from rich.progress_bar import ProgressBar
        from rich.spinner import Spinner
        from rich.table import Table

        grid = Table.grid(padding=(0, 1))
        with self._lock:
            state = self.current
            if state is None:
                grid.add_row(Spinner("dots"), "starting the flow…")
                return grid
            now = self.clock()
            llm = state.llm.most(self._engines_now() - state.engines_at_start)
            if state.done or state.batches:
                text = batch_line(state, now, llm=llm)
            else:  # a whole step, or a batched one before its first batch is done
                text = f"{state.step} | {llm_text(llm, now - state.started)}"
            elapsed = duration(now - state.started)
            bar = ProgressBar(total=state.batches, completed=state.done, width=20) if state.batches else ""
        grid.add_row(Spinner("dots"), bar, f"{text} | {elapsed}")
        return grid


def _stdout_line(line: str) -> None:
    # sys.stdout directly: inside a flow with log_prints=True, Prefect turns print() into log records
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def show_progress(live: bool | None = None, console: Any = None) -> Iterator[ProgressHandler]:
    """Render ``autoif.progress`` events while the block runs (``live``: default, whether stdout is a terminal)."""
    if live is None:
        live = sys.stdout.isatty()
    handler = ProgressHandler(live=live, console=console)
    logger = logging.getLogger(LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    handler.start()
    try:
        yield handler
    finally:
        handler.stop()
        logger.removeHandler(handler)
        logger.setLevel(level)
