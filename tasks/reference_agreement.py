"""Stage A's precision where the answer is known: each function synthesized for a seed instruction is run,
in the sandbox, beside the seed's shipped reference function on the probe responses (and the reference's
test cases); its agreement is the share of inputs where both give the same verdict. The mean over a run's
functions is the synthesis precision it achieved (logged to MLflow)."""
from __future__ import annotations

import json

import pandas as pd
from autoif.tasks.cross_validation import probes_path, read_probes
from autoif.tasks.metrics import histogram

from autoif.config import CrossValidationConfig

AGREEMENT_COLUMNS = ["instruction_id", "instruction", "family", "completion", "func_key", "agreement", "n_inputs",
                     "reference_errors", "reason"]


def reference_agreement(candidates: pd.DataFrame, seeds: pd.DataFrame, cfg: CrossValidationConfig, sandbox) -> pd.DataFrame:
    """One row per synthesized function of a seed that has a reference (other instructions are not scored)."""
    refs = {r.instruction_id: r for r in seeds.itertuples() if isinstance(getattr(r, "reference_func", None), str)}
    mine = candidates[candidates["instruction_id"].isin(refs)]
    probes = list(read_probes(str(probes_path(cfg))))
    rows = []
    for iid, group in mine.groupby("instruction_id", sort=False):
        ref = refs[iid]
        inputs = probes + [c["input"] for c in json.loads(ref.reference_cases or "[]")]
        srcs = [ref.reference_func, *group["func"].tolist()]
        results = sandbox.run(srcs, inputs)
        verdicts: dict[tuple[int, int], bool | None] = {(r.func_index, r.input_index): r.value for r in results}
        ref_errors = sum(verdicts[(0, j)] is None for j in range(len(inputs)))
        for k, f in enumerate(group.itertuples(), start=1):
            same = sum(verdicts[(k, j)] is not None and verdicts[(k, j)] == verdicts[(0, j)] for j in range(len(inputs)))
            rows.append({"instruction_id": iid, "instruction": ref.instruction, "family": ref.family,
                         "completion": int(f.completion), "func_key": f.func_key, "agreement": same / len(inputs),
                         "n_inputs": len(inputs), "reference_errors": ref_errors, "reason": None})
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


def agreement_metrics(df: pd.DataFrame) -> dict[str, float]:
    out = histogram([float(a) for a in df["agreement"]], "agreement")
    out["functions_scored"] = float(len(df))
    out["functions_exact"] = float((df["agreement"] == 1.0).sum())
    if len(df):  # the mean agreement: how often the synthesized functions judge like the reference
        out["synthesis_precision"] = out["agreement.sum"] / out["agreement.count"]
    return out
