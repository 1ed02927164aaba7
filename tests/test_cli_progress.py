"""Progress on long work: the ``autoif.progress`` events rendered as plain lines (no terminal) or a live line
(terminal), and the lines a real ``autoif run`` prints per batch and per step."""
import io
import logging
import subprocess

import pytest
import yaml

from autoif.progress import LLMCount, ProgressHandler, duration, human, show_progress
from autoif.runtime.orchestration import emit
from tests.conftest import write_script
from tests.test_cli import AUTOIF, self_instruct_script
from tests.test_cli_errors import harness_env, seeds_file  # noqa: F401  (a fixture)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def usage(requests: int, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"llm_requests": float(requests), "llm_prompt_tokens": float(prompt_tokens),
            "llm_completion_tokens": float(completion_tokens)}


@pytest.fixture
def plain():
    """A plain-mode handler on the real ``autoif.progress`` logger, with a clock the test moves."""
    clock, lines = Clock(), []
    handler = ProgressHandler(live=False, write=lines.append, clock=clock, engines=LLMCount)
    logger = logging.getLogger("autoif.progress")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield clock, lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_plain_lines_per_batch_and_step(plain):
    clock, lines = plain
    emit("step_start", step="verifier_synthesis", key="k")
    for b in range(3):
        clock.now += 20
        emit("batch_done", step="verifier_synthesis", batch=b, batches=8, done=b + 1, rows=8, kept=6 + (b == 2) * 2,
             usage=usage(32, 10_000, 3_733), sandbox_calls=0, seconds=20.0, reused=False)
    clock.now += 100
    emit("step_done", step="verifier_synthesis", rows_in=64, kept=50, reused=False, uri="/s")
    assert lines == [
        "verifier_synthesis [1/8] 8 rows, 6 kept | llm 32 req, 13.7k tok (687 tok/s) | sandbox 0 | eta 2m20s",
        "verifier_synthesis [2/8] 16 rows, 12 kept | llm 64 req, 27.5k tok (687 tok/s) | sandbox 0 | eta 2m00s",
        "verifier_synthesis [3/8] 24 rows, 20 kept | llm 96 req, 41.2k tok (687 tok/s) | sandbox 0 | eta 1m40s",
        "verifier_synthesis done: 64 in, 50 kept | 2m40s",
    ]


def test_plain_lines_without_a_total_reused_and_sandbox(plain):
    clock, lines = plain
    emit("step_start", step="cross_validation", key="k")
    clock.now += 4
    emit("batch_done", step="cross_validation", batch=0, batches=None, done=1, rows=12, kept=5, usage={},
         sandbox_calls=340, seconds=4.0, reused=True)
    clock.now += 2
    emit("batch_done", step="cross_validation", batch=1, batches=None, done=2, rows=3, kept=0, usage={},
         sandbox_calls=60, seconds=2.0, reused=False)
    emit("step_done", step="cross_validation", rows_in=8, kept=5, reused=False, uri="/s")
    emit("step_done", step="seeds", rows_in=0, kept=40, reused=True, uri="/s")  # no step_start seen: still a line
    assert lines == [
        "cross_validation [1] 12 rows, 5 kept, 1 reused | llm 0 req, 0 tok | sandbox 340",
        "cross_validation [2] 15 rows, 5 kept, 1 reused | llm 0 req, 0 tok | sandbox 400",
        "cross_validation done: 8 in, 5 kept | 6s",
        "seeds done: 0 in, 40 kept (reused)",
    ]


def test_numbers():
    assert [human(n) for n in (0, 7, 0.5, 310.4, 41_234, 1_500_000)] == ["0", "7", "0.5", "310", "41.2k", "1.5M"]
    assert [duration(s) for s in (4.2, 100, 3725)] == ["4s", "1m40s", "1h02m"]


def test_live_line_polls_the_engines_between_batch_events():
    """On a terminal the line moves while a batch runs: the engines' counters are read at each refresh."""
    from rich.console import Console

    clock, counters = Clock(), [LLMCount(100, 9_000)]  # an earlier step's usage: not this step's
    handler = ProgressHandler(live=True, console=Console(file=io.StringIO(), force_terminal=True, width=200),
                              clock=clock, engines=lambda: counters[-1])

    def screen() -> str:
        out = Console(file=io.StringIO(), force_terminal=False, width=250)
        out.print(handler.render())
        return out.file.getvalue()

    assert "starting the flow" in screen()
    handler.handle(logging.makeLogRecord({"progress": {"event": "step_start", "step": "back_translation", "key": "k"}}))
    clock.now, counters[-1] = 10.0, LLMCount(140, 13_000)  # 40 requests in flight, no batch finished yet
    assert "back_translation | llm 40 req, 4.0k tok (400 tok/s) | 10s" in screen()
    handler.handle(logging.makeLogRecord({"progress": {
        "event": "batch_done", "step": "back_translation", "batch": 0, "batches": 4, "done": 1, "rows": 16, "kept": 12,
        "usage": usage(40, 3_000, 1_000), "sandbox_calls": 0, "seconds": 10.0, "reused": False}}))
    assert "back_translation [1/4] 16 rows, 12 kept | llm 40 req, 4.0k tok (400 tok/s) | sandbox 0 | eta 30s" in screen()


def test_live_display_starts_prints_finished_steps_and_stops():
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    with show_progress(live=True, console=console) as handler:
        assert handler.live
        emit("step_start", step="seeds", key="k")
        emit("step_done", step="seeds", rows_in=0, kept=40, reused=True, uri="/s")
    assert "seeds done: 0 in, 40 kept (reused)" in console.file.getvalue()
    assert handler not in logging.getLogger("autoif.progress").handlers


GOOD = '```json\n{"func": "def evaluate(response):\\n    return len(response) > 3", "cases": [{"input": "long enough", "output": true}, {"input": "no", "output": false}]}\n```'


def test_run_prints_a_line_per_batch_and_the_funnel(harness_env, tmp_path):  # noqa: F811  (the fixture)
    from autoif.tasks.verifier_synthesis import verifier_prompt

    from autoif.config import load_config

    seeds = seeds_file(tmp_path)  # three seeds; self-instruct adds one: four instructions, two per batch
    new = "Write exactly three sentences in your answer."
    cfg = load_config(overrides={"self_instruct.seeds_path": str(seeds)})
    instructions = [yaml.safe_load(line)["instruction"] for line in seeds.read_text().splitlines()] + [new]
    script = self_instruct_script(cfg, [f"- {new}"])
    script += [{"prompt": verifier_prompt(i, cfg.verifier_synthesis), "outputs": [GOOD, "I cannot do that."]} for i in instructions]
    write_script(tmp_path / "script.jsonl", script)
    conf = tmp_path / "run.yaml"
    conf.write_text(yaml.safe_dump({
        "run_name": "cli-progress", "engine": {"kind": "scripted", "scripted_path": str(tmp_path / "script.jsonl")},
        "store": {"root": str(tmp_path / "store")}, "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "self_instruct": {"seeds_path": str(seeds), "n_calls": 1},
        "verifier_synthesis": {"batch_size": 2, "n_completions": 2},
    }))
    r = subprocess.run([AUTOIF, "run", "-c", str(conf), "--until", "verifier_synthesis"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env=harness_env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.splitlines()
    assert "self_instruct done: 3 in, 4 kept | " in r.stdout
    batches = [l for l in out if l.startswith("verifier_synthesis [")]
    assert [l.split(" | ")[0] for l in batches] == ["verifier_synthesis [1/2] 4 rows, 2 kept",
                                                   "verifier_synthesis [2/2] 8 rows, 4 kept"], r.stdout
    assert " | llm 2 req, 0 tok (" in batches[0] and " | sandbox 0 | eta " in batches[0]
    assert " | llm 4 req, 0 tok (" in batches[1]
    assert any(l.startswith("verifier_synthesis done: 4 in, 4 kept") for l in out), r.stdout
    funnel = next(l for l in out if l.startswith("│ verifier_synthesis"))
    assert "no_json 4" in funnel, r.stdout
