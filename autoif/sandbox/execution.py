"""Running generated functions: the guarded builtins, compiling a source once, calling it on
inputs and turning return values and exceptions into outcome codes.

Used inside a worker's child (:func:`run_function`, the streaming loop) and in the calling process
for ``isolation=none`` (:func:`run_calls`). Standard library only, like everything the worker loads.
"""
from __future__ import annotations

import builtins
import sys
import time

from .protocol import (
    ERROR,
    FAIL,
    INVALID,
    PASS,
    PROGRESS,
    PROGRESS_CALL,
    compile_error_line,
    result_line,
)

_FORBIDDEN_BUILTINS = ("open", "input", "breakpoint", "help", "exit", "quit", "copyright", "credits", "license")


def short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def normalise(value, detail_chars: int = 200):
    """Map a return value to (code, detail). Only exact bool, int 0/1 and str "true"/"false" count.

    Uses ``type(...) is`` checks so no user-defined ``__eq__``/``__bool__``/``__str__`` runs here.
    """
    t = type(value)
    if t is bool:
        return (PASS, "") if value else (FAIL, "")
    if t is int:
        if value == 1:
            return PASS, ""
        if value == 0:
            return FAIL, ""
        return INVALID, short(f"returned int {value if abs(value) < 10**12 else '(large)'}", detail_chars)
    if t is str:
        s = value.strip().lower() if len(value) <= 32 else ""
        if s == "true":
            return PASS, ""
        if s == "false":
            return FAIL, ""
        return INVALID, short(f"returned str {value[:40]!r}", detail_chars)
    if value is None:
        return INVALID, "returned None"
    name = getattr(t, "__name__", "?")
    if type(name) is not str:  # noqa: E721 - a hostile metaclass could make __name__ anything
        name = "?"
    return INVALID, short(f"returned {name[:60]}", detail_chars)


def describe_exception(exc: BaseException, detail_chars: int = 200) -> str:
    name = type(exc).__name__
    try:
        msg = str(exc)
    except BaseException:  # a hostile __str__; the call is still under the watchdog
        msg = "<unprintable>"
    if type(msg) is not str:  # noqa: E721
        msg = "<unprintable>"
    return short(f"{name}: {msg}" if msg else name, detail_chars)


def make_import(allowed: frozenset[str], real_import=builtins.__import__):
    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level != 0:
            raise ImportError("relative imports are not allowed in verification functions")
        if type(name) is not str or name.partition(".")[0] not in allowed:  # noqa: E721
            raise ImportError(f"import of {name!r} is not allowed (allowed: {', '.join(sorted(allowed))})")
        return real_import(name, globals, locals, fromlist, level)

    return guarded_import


def make_builtins(allowed: frozenset[str]) -> dict:
    b = dict(builtins.__dict__)
    for k in _FORBIDDEN_BUILTINS:
        b.pop(k, None)
    b["__import__"] = make_import(allowed)
    return b


def make_namespace(safe_builtins: dict) -> dict:
    # a fresh copy per function: patching builtins only changes this function's view
    return {"__builtins__": dict(safe_builtins), "__name__": "verifier"}


def compile_function(src: str, safe_builtins: dict, detail_chars: int = 200):
    """Compile + exec the source once; return (evaluate, None) or (None, detail)."""
    if type(src) is not str:  # noqa: E721
        return None, "source is not a string"
    try:
        code = compile(src, "<verifier>", "exec")
    except BaseException as exc:  # SyntaxError, ValueError (null bytes), RecursionError, MemoryError
        return None, describe_exception(exc, detail_chars)
    ns = make_namespace(safe_builtins)
    try:
        exec(code, ns)
    except BaseException as exc:
        return None, "module code raised " + describe_exception(exc, detail_chars)
    fn = ns.get("evaluate")
    if not callable(fn):
        return None, "no callable `evaluate` defined"
    return fn, None


def run_calls(fn, inputs, detail_chars: int = 200, progress=None):
    """In-process loop used by isolation=none (the child has its own streaming loop)."""
    out = []
    for k, inp in enumerate(inputs):
        if progress is not None:
            progress(k)
        try:
            out.append(normalise(fn(inp), detail_chars))
        except BaseException as exc:
            out.append((ERROR, describe_exception(exc, detail_chars)))
    return out


class Sink:
    """Replaces sys.stdout/sys.stderr in the child: prints are discarded, never reach the pipe."""

    encoding = "utf-8"

    def write(self, s):
        return len(s) if isinstance(s, str) else 0

    def flush(self):
        return None

    def isatty(self):
        return False


def run_function(src, inputs, flush_interval_s: float, max_output_chars: int, safe_builtins, progress,
                 detail_chars, emit):
    """The child's loop for one function: compile it, call it on each input, stream result lines
    through `emit`. Before each call the call's index goes into the progress page the parent watches."""
    # the call index lives in the second 8-byte slot of the shared progress page (little-endian)
    slots = memoryview(progress).cast("q") if sys.byteorder == "little" else None
    result_line_, pack_into = result_line, PROGRESS.pack_into
    fn, err = compile_function(src, safe_builtins, detail_chars)
    del src
    if fn is None:
        emit(compile_error_line(err))
        return

    n = len(inputs)
    codes: list[str] = []
    details: dict[str, str] = {}
    start = 0
    now = time.perf_counter
    last_flush = now()
    flush_every = float(flush_interval_s)
    # keep every result line well under the parent's per-message cap
    max_pending = max(1, int(max_output_chars) // 4)
    pending = 0
    append = codes.append
    for k in range(n):
        inp = inputs[k]
        inputs[k] = None  # the list only ever holds inputs not yet evaluated
        if slots is not None:
            slots[1] = k
        else:
            pack_into(progress, PROGRESS_CALL, k)
        try:
            v = fn(inp)
        except BaseException as exc:  # noqa: BLE001 - every exception is an `error` outcome
            append(ERROR)
            d = describe_exception(exc, detail_chars)
            details[str(k - start)] = d
            pending += len(d) + 16
        else:
            if type(v) is bool:
                append(PASS if v else FAIL)
            else:
                c, d = normalise(v, detail_chars)
                append(c)
                if d:
                    details[str(k - start)] = d
                    pending += len(d) + 16
        inp = v = None
        pending += 1
        if pending > max_pending or (not k & 15 and now() - last_flush > flush_every):
            emit(result_line_(start, "".join(codes), details))
            start += len(codes)
            codes, details = [], {}
            append = codes.append
            pending = 0
            last_flush = now()
    pack_into(progress, PROGRESS_CALL, n)
    emit(result_line_(start, "".join(codes), details, n))

