"""autoif.sandbox: a protocol violation is charged to the function that committed it, never to the
innocent functions of the same job that the job runner starts before the parent's kill lands.

The race (red-team corpus: ``forged_results`` followed by ``huge_return_value``): the parent sees a
forged line from function A and asks the zygote to kill the job, but the job runner may already
have ended A's child and started B's; B is then cut off by a kill that was meant for A. B must be
re-run in a fresh child and get its true outcome, not "killed: protocol violation".
"""
from __future__ import annotations

import time

import pytest

from autoif.sandbox import DEFAULT_ALLOWED_MODULES, Outcome, Sandbox
from autoif.sandbox import pool as pool_mod

# reaches the real os module (the allow-list is policy, not the boundary) and forges a line on the
# child's result pipe that the parent cannot parse as a result ({"t": "exit"} has no "s")
HOSTILE = '''
def _os():
    for c in ().__class__.__base__.__subclasses__():
        if c.__name__ == "_wrap_close":
            return c.__init__.__globals__["sys"].modules["os"]

def evaluate(r):
    _os().write(1, b'{"t": "exit", "j": 1}\\n{"s":0,"o":"pp"}\\n')
    return True
'''
# innocent and slow: still running when the (held back) kill lands
SLOW = "import time\n\ndef evaluate(r):\n    time.sleep(0.4)\n    return r == 'x'\n"
AFTER = "def evaluate(r):\n    return len(r) == 1\n"


def _hold_back_violation_kill(monkeypatch) -> dict:
    """Test-only hook: the kill the parent sends for a protocol violation goes out only once the job
    runner has started the next function (or after 1 s), i.e. the race is forced every time."""
    state = {"held": None, "since": 0.0, "sent_while": None}
    orig_send, orig_service = pool_mod.Worker._send_kill, pool_mod.Worker.service

    def send_kill(self, run, now):
        if run.violation is not None and state["held"] is None and state["sent_while"] is None:
            state["held"], state["since"] = (self, run), time.monotonic()
            run.kill_sent_at = now  # as far as the parent is concerned, the kill is on its way
            return
        orig_send(self, run, now)

    def service(self):
        retry = orig_service(self)
        held = state["held"]
        if held is not None and held[0] is self:
            run = held[1]
            moved_on = run.cur is not None and run.cur != run.kill_fn  # kill_fn: running at detection
            if moved_on or run not in self.inflight or time.monotonic() - state["since"] > 1.0:
                state["held"], state["sent_while"] = None, run.cur
                if run in self.inflight:
                    orig_send(self, run, time.monotonic())
        return retry

    monkeypatch.setattr(pool_mod.Worker, "_send_kill", send_kill)
    monkeypatch.setattr(pool_mod.Worker, "service", service)
    return state


@pytest.mark.parametrize("forced", [True, False], ids=["kill-lands-late", "kill-lands-when-it-may"])
def test_protocol_violation_is_charged_to_its_function_only(monkeypatch, forced):
    state = _hold_back_violation_kill(monkeypatch) if forced else None
    # one worker, one input chunk: HOSTILE, SLOW and AFTER are one job, run in this order
    with Sandbox(workers=1, timeout_s=3.0, allowed_modules=(*DEFAULT_ALLOWED_MODULES, "time")) as sb:
        res = sb.run([HOSTILE, SLOW, AFTER], ["x", "y"])
        stats = sb.child_stats
        # the pool still answers correctly afterwards
        assert [r.outcome for r in sb.run([AFTER], ["a", "bc"])] == [Outcome.passed, Outcome.failed]
    if forced:
        # the race did happen: the kill went out while the innocent SLOW function (index 1) was running
        assert state["sent_while"] == 1, state
    got = [(r.func_index, r.input_index, r.outcome) for r in res]
    # the hostile function is killed, for every call
    assert got[:2] == [(0, 0, Outcome.killed), (0, 1, Outcome.killed)], res
    assert all("protocol violation" in r.detail for r in res[:2]), res
    # nothing innocent is charged: the cut-off function was re-run and got its true outcome
    assert got[2:] == [(1, 0, Outcome.passed), (1, 1, Outcome.failed), (2, 0, Outcome.passed),
                       (2, 1, Outcome.passed)], res
    assert not any("protocol violation" in r.detail for r in res[2:]), res
    if forced:
        assert stats["fresh"] >= 3  # HOSTILE, SLOW (cut off), SLOW again in a fresh child
