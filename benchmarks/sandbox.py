"""Throughput of the sandbox for generated verification functions (issue 4, acceptance 5).

200 realistic verification functions (IFEval-style checks written the way LLMs write them) x 500
synthetic responses, measured in one run:

  (a) plain in-process ``exec`` on one core (the published AutoIF code's approach; no protection)
  (b) ``autoif.sandbox.Sandbox()`` with default settings (one confined worker per core)
  (c) a per-call subprocess baseline (a fresh ``python`` per call, the human-eval style) on a sample

and prints evals/s for each plus the ratios b/a (target >= 1.0 on 2 cores) and b/c (target >= 100).

    PYTHONPATH=. python benchmarks/sandbox.py [--funcs 200] [--responses 500] [--sample 40] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoif.sandbox import Sandbox  # noqa: E402

# ---------------------------------------------------------------------------------------------- functions
_TEMPLATES = [
    # (template, list of parameter dicts)
    ('def evaluate(response):\n    """All lowercase."""\n    return response == response.lower()\n', [{}]),
    ("def evaluate(response):\n    words = response.split()\n    return len(words) >= {n}\n",
     [{"n": n} for n in (20, 50, 80, 120, 150, 200, 250, 300)]),
    ("def evaluate(response):\n    return len(response.split()) < {n}\n", [{"n": n} for n in (40, 100, 160, 220, 300, 400)]),
    ("import re\n\ndef evaluate(response):\n    hits = re.findall(r'\\b{kw}\\b', response, flags=re.IGNORECASE)\n"
     "    return len(hits) >= {n}\n",
     [{"kw": k, "n": n} for k in ("data", "model", "time", "system", "people") for n in (1, 2, 3)]),
    ("def evaluate(response):\n    lines = [l for l in response.splitlines() if l.strip()]\n"
     "    bullets = [l for l in lines if l.lstrip().startswith(('* ', '- '))]\n    return len(bullets) == {n}\n",
     [{"n": n} for n in (2, 3, 4, 5, 6)]),
    ("def evaluate(response):\n    paragraphs = [p for p in response.split('\\n\\n') if p.strip()]\n"
     "    return len(paragraphs) == {n}\n", [{"n": n} for n in (1, 2, 3, 4, 5)]),
    ("def evaluate(response):\n    return response.strip().endswith({p!r})\n",
     [{"p": p} for p in ("Is there anything else I can help with?", "Let me know.", "Thanks.", "End.")]),
    ("def evaluate(response):\n    return response.lstrip().lower().startswith({p!r})\n",
     [{"p": p} for p in ("sure", "here", "the", "in")]),
    ("def evaluate(response):\n    return ',' not in response\n", [{}]),
    ("import json\n\ndef evaluate(response):\n    text = response.strip()\n    if text.startswith('```'):\n"
     "        text = text.strip('`')\n        if text.startswith('json'):\n            text = text[4:]\n"
     "    try:\n        json.loads(text)\n    except ValueError:\n        return False\n    return True\n", [{}]),
    ("import re\n\ndef evaluate(response):\n    return re.search(r'<<[^\\n]+>>', response) is not None\n", [{}]),
    ("import re\n\ndef evaluate(response):\n    sentences = [s for s in re.split(r'[.!?]+\\s*', response) if s.strip()]\n"
     "    return len(sentences) <= {n}\n", [{"n": n} for n in (3, 5, 8, 10, 15, 20, 30)]),
    ("def evaluate(response):\n    caps = [w for w in response.split() if w.isupper() and len(w) > 1]\n"
     "    return len(caps) {op} {n}\n", [{"op": op, "n": n} for op in ("<", ">=") for n in (1, 3, 5, 10)]),
    ("import re\n\ndef evaluate(response):\n    return len(re.findall(r'\\[[^\\]]+\\]', response)) >= {n}\n",
     [{"n": n} for n in (1, 2, 3)]),
    ("import re\n\ndef evaluate(response):\n    return len(re.findall(r'\\*[^\\n\\*]+\\*', response)) >= {n}\n",
     [{"n": n} for n in (1, 2, 3, 4)]),
    ("def evaluate(response):\n    return response.lower().count({ch!r}) >= {n}\n",
     [{"ch": c, "n": n} for c in "qzxk" for n in (2, 5, 10)]),
    ("import unicodedata\n\ndef evaluate(response):\n    letters = [c for c in response if c.isalpha()]\n"
     "    if not letters:\n        return False\n"
     "    latin = sum(1 for c in letters if 'LATIN' in unicodedata.name(c, ''))\n"
     "    return latin / len(letters) > {r}\n", [{"r": r} for r in (0.5, 0.9, 0.99)]),
    ("import re\n\ndef evaluate(response):\n    return re.search(r'^\\s*P\\.S\\.', response, flags=re.MULTILINE) is not None\n",
     [{}]),
    ("def evaluate(response):\n    count = 0\n    for line in response.splitlines():\n"
     "        if line.strip().upper().startswith('SECTION'):\n            count += 1\n    return count == {n}\n",
     [{"n": n} for n in (2, 3, 4)]),
    ("FORBIDDEN = {words!r}\n\ndef evaluate(response):\n    lowered = response.lower()\n"
     "    return not any(w in lowered for w in FORBIDDEN)\n",
     [{"words": w} for w in (["very", "really"], ["however"], ["data", "model"], ["i think"], ["clearly", "obviously"])]),
    ("from collections import Counter\n\ndef evaluate(response):\n    words = [w.strip('.,!?').lower() for w in response.split()]\n"
     "    if not words:\n        return False\n    most = Counter(words).most_common(1)[0][1]\n    return most <= {n}\n",
     [{"n": n} for n in (3, 5, 8, 12, 20)]),
    ("import string\n\ndef evaluate(response):\n    punct = sum(1 for c in response if c in string.punctuation)\n"
     "    return punct <= len(response) * {r}\n", [{"r": r} for r in (0.01, 0.02, 0.05)]),
    ("def _words(text):\n    return [w for w in text.replace('\\n', ' ').split(' ') if w]\n\n"
     "def evaluate(response):\n    words = _words(response)\n    long_words = [w for w in words if len(w) >= {k}]\n"
     "    return len(long_words) >= {n}\n", [{"k": k, "n": n} for k in (8, 10) for n in (3, 6, 10)]),
    ("def evaluate(response):\n    if not response:\n        return 'false'\n    first = response.strip().split('\\n')[0]\n"
     "    return 'true' if first.istitle() else 'false'\n", [{}]),
    ("import re\n\ndef evaluate(response):\n    return 1 if re.fullmatch(r'[^\\d]*', response) else 0\n", [{}]),
]


def make_functions(n: int) -> list[str]:
    all_funcs = [t.format(**p) for t, params in _TEMPLATES for p in params]
    out = []
    k = 0
    while len(out) < n:  # cycle with a harmless comment so every source is distinct
        out.append(all_funcs[k % len(all_funcs)] + f"# variant {k // len(all_funcs)}\n")
        k += 1
    return out


_VOCAB = ("the data model time system people analysis result process network value table method "
          "approach question answer example context language response however really very clearly "
          "important quickly zebra quartz xylophone kayak jazz fizz buzz information development "
          "management performance international organization responsibility").split()


def make_responses(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.1:
            obj = {"title": rng.choice(_VOCAB), "items": [rng.choice(_VOCAB) for _ in range(rng.randint(2, 8))]}
            out.append("```json\n" + json.dumps(obj, indent=2) + "\n```")
            continue
        parts = []
        if rng.random() < 0.3:
            parts.append(f"<<{rng.choice(_VOCAB).title()} {rng.choice(_VOCAB).title()}>>")
        for _p in range(rng.randint(1, 5)):
            if rng.random() < 0.25:
                parts.append("\n".join(f"{rng.choice('*-')} " + " ".join(rng.choice(_VOCAB) for _ in range(rng.randint(3, 9)))
                                       for _ in range(rng.randint(2, 6))))
                continue
            sents = []
            for _s in range(rng.randint(2, 7)):
                words = [rng.choice(_VOCAB) for _ in range(rng.randint(5, 18))]
                if rng.random() < 0.2:
                    words[rng.randrange(len(words))] = "[" + rng.choice(_VOCAB) + "]"
                if rng.random() < 0.2:
                    words[rng.randrange(len(words))] = "*" + rng.choice(_VOCAB) + "*"
                if rng.random() < 0.1:
                    words[rng.randrange(len(words))] = rng.choice(_VOCAB).upper()
                sent = " ".join(words)
                sents.append(sent[0].upper() + sent[1:] + rng.choice([".", ".", "!", "?", ", indeed."]))
            parts.append(" ".join(sents))
        if rng.random() < 0.2:
            parts.append("P.S. " + " ".join(rng.choice(_VOCAB) for _ in range(6)) + ".")
        text = "\n\n".join(parts)
        if rng.random() < 0.2:
            text = text.lower()
        if rng.random() < 0.15:
            text += " Is there anything else I can help with?"
        out.append(text)
    return out


# ---------------------------------------------------------------------------------------------- (a) in-process
def bench_inprocess(funcs: list[str], responses: list[str]) -> tuple[float, list[bool | None]]:
    t0 = time.perf_counter()
    values: list[bool | None] = []
    for src in funcs:
        ns: dict = {}
        exec(compile(src, "<verifier>", "exec"), ns)
        ev = ns["evaluate"]
        for r in responses:
            try:
                v = ev(r)
            except Exception:
                values.append(None)
                continue
            values.append(True if v is True or v == 1 or v == "true" else False if v is False or v == 0 or v == "false" else None)
    dt = time.perf_counter() - t0
    return len(funcs) * len(responses) / dt, values


# ---------------------------------------------------------------------------------------------- (c) per call
_PER_CALL = r"""
import json, sys
src, response = json.loads(sys.stdin.read())
ns = {}
exec(compile(src, "<verifier>", "exec"), ns)
print(json.dumps(bool(ns["evaluate"](response))))
"""


def bench_per_call(funcs: list[str], responses: list[str], sample: int, seed: int = 1) -> float:
    rng = random.Random(seed)
    pairs = [(rng.randrange(len(funcs)), rng.randrange(len(responses))) for _ in range(sample)]
    t0 = time.perf_counter()
    for i, j in pairs:
        subprocess.run([sys.executable, "-I", "-c", _PER_CALL], input=json.dumps([funcs[i], responses[j]]),
                       capture_output=True, text=True, timeout=10, check=True)
    return sample / (time.perf_counter() - t0)


def _tree(pid: int) -> list[int]:
    """pid and its descendants (the bwrap process, the zygote inside it)."""
    out = [pid]
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as fh:
                for c in fh.read().split():
                    out += _tree(int(c))
    except OSError:
        pass
    return out


def _cpu(pids: list[int]) -> float:
    """CPU seconds used by these processes and their reaped children (the per-job forks)."""
    tck = os.sysconf("SC_CLK_TCK")
    tot = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as fh:
                st = fh.read().rsplit(")", 1)[1].split()
            tot += sum(int(x) for x in st[11:15])
        except OSError:
            pass
    return tot / tck


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--funcs", type=int, default=200)
    ap.add_argument("--responses", type=int, default=500)
    ap.add_argument("--sample", type=int, default=40, help="calls for the per-call subprocess baseline")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions of (a) and (b); best is reported")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    funcs = make_functions(args.funcs)
    responses = make_responses(args.responses)
    n = len(funcs) * len(responses)
    print(f"{len(funcs)} functions x {len(responses)} responses = {n} evals; {os.cpu_count()} CPUs", flush=True)

    a_runs = []
    for _ in range(args.repeat):
        rate, ref = bench_inprocess(funcs, responses)
        a_runs.append(rate)
    a = max(a_runs)
    print(f"(a) in-process exec, 1 core:         {a:10.0f} evals/s", flush=True)

    t0 = time.perf_counter()
    cpu_a = time.process_time()
    bench_inprocess(funcs, responses)
    cpu_a = (time.process_time() - cpu_a) / n  # CPU seconds per eval, in-process

    with Sandbox() as sb:
        startup = time.perf_counter() - t0
        sb.run(funcs[:4], responses[:50])  # warm-up
        b_runs = []
        pids = [q for p in sb.worker_pids for q in _tree(p)]
        c0, p0 = _cpu(pids), time.process_time()
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            res = sb.run(funcs, responses)
            b_runs.append(n / (time.perf_counter() - t0))
        cpu_b = (_cpu(pids) - c0 + time.process_time() - p0) / (n * args.repeat)
        mode, workers, children = sb.isolation.value, sb.workers, sb.child_stats
    b = max(b_runs)
    got = [r.value for r in res]
    agree = sum(1 for x, y in zip(ref, got) if x == y) / n
    outcomes: dict[str, int] = {}
    for r in res:
        outcomes[r.outcome.value] = outcomes.get(r.outcome.value, 0) + 1
    print(f"(b) Sandbox(), {workers} workers, {mode}: {b:10.0f} evals/s  (pool start {startup:.2f}s; "
          f"agreement with (a) {agree:.4f}; outcomes {outcomes}; functions started in a fresh/reused child "
          f"{children['fresh']}/{children['reused']})", flush=True)

    c = bench_per_call(funcs, responses, args.sample)
    print(f"(c) per-call subprocess ({args.sample} calls):  {c:10.1f} evals/s", flush=True)
    fig = {
        "funcs": len(funcs), "responses": len(responses), "cpus": os.cpu_count(), "isolation": mode,
        "workers": workers, "a_evals_per_s": a, "b_evals_per_s": b, "c_evals_per_s": c,
        "b_over_a": b / a, "b_over_c": b / c, "agreement": agree, "a_runs": a_runs, "b_runs": b_runs,
        "children": children,
    }
    ncpu = os.cpu_count() or 1
    projected = ncpu * cpu_a / cpu_b
    fig.update(cpu_us_per_eval_a=cpu_a * 1e6, cpu_us_per_eval_b=cpu_b * 1e6, b_over_a_cpu_projected=projected,
               loadavg=os.getloadavg())
    print(f"b/a = {b / a:.2f}  (target >= 1.0 on 2 cores)")
    print(f"    CPU per eval: (a) {cpu_a * 1e6:.1f} us, (b) {cpu_b * 1e6:.1f} us (parent + workers); "
          f"b/a projected for {ncpu} idle cores = {projected:.2f}; load average now {os.getloadavg()[0]:.1f}")
    print(f"b/c = {b / c:.0f}  (target >= 100)")
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2))
    return fig


if __name__ == "__main__":
    main()
