"""AutoIF step 10, online iterations: the current policy samples K responses per training prompt at T=0.8;
stage B's verification, quality gate and pairing then make this iteration's preference pairs (flows/online.py).
Plain functions of frames; the policy engine comes from :func:`autoif.policy.policy_llm`."""
from __future__ import annotations

import math

import pandas as pd
from autoif.tasks.response_generation import RESPONSE_COLUMNS
from autoif.tasks.training_data import training_prompt

from autoif.config import OnlineConfig, RunConfig
from autoif.llm import generate_each
from autoif.policy import policy_llm, policy_model_name


def training_prompts(prompts: pd.DataFrame, cfg: OnlineConfig) -> pd.DataFrame:
    """The stage B pairs the iterations train on: the first ``max_prompts`` in pair order (the same every
    iteration, so the curve compares like with like)."""
    ordered = prompts.sort_values("pair_id", kind="mergesort")
    return ordered.head(cfg.max_prompts) if cfg.max_prompts else ordered


def sample_responses(prompts: pd.DataFrame, init: pd.DataFrame, cfg: RunConfig, seed: int, iteration: int) -> pd.DataFrame:
    """K responses per prompt from the current policy (``init``: the latest model; empty = the base) at the
    online temperature; an empty response is ``empty_response``, an engine fault that prompt's reason."""
    weights = bytes(init["weights"].iloc[0]) if len(init) else None
    llm = policy_llm(cfg.policy, weights, policy_model_name(weights))
    batch = training_prompts(prompts, cfg.online)
    # the policy answers the prompt it is trained on (query then instruction, as the SFT and DPO rows), not stage
    # B's supervision template
    asked = [training_prompt(q, i) for q, i in zip(batch["query"], batch["instruction"])]
    gen = generate_each(llm, asked, n=cfg.online.samples_per_prompt, temperature=cfg.online.temperature,
                        max_tokens=cfg.online.max_new_tokens, seed=seed + 1000 * iteration)
    rows = []
    for pair, prompt, texts, error in zip(batch.to_dict("records"), asked, gen.texts, gen.errors):
        base = {**{k: pair[k] for k in RESPONSE_COLUMNS if k in pair and k != "reason"}, "prompt": prompt}
        if texts is None:
            rows.append({**base, "response_id": f"{pair['pair_id']}-0", "response_index": 0, "response": None, "reason": error})
            continue
        for k, text in enumerate(texts):
            text = text.strip() if isinstance(text, str) else ""
            rows.append({**base, "response_id": f"{pair['pair_id']}-{k}", "response_index": k, "response": text,
                         "reason": None if text else "empty_response"})
    return pd.DataFrame(rows, columns=RESPONSE_COLUMNS)


def ungated(verified: pd.DataFrame) -> pd.DataFrame:
    """With ``online.quality_gate`` off: the verifier-passing samples are the chosen candidates as they are."""
    out = verified.copy()
    out["score"] = math.nan
    out["score_analysis"] = ""
    return out


def iteration_summary(verified: pd.DataFrame, gate_in: int, gate_kept: int, pairs: int,
                      model: pd.DataFrame | None) -> dict[str, float]:
    """What one iteration did: the policy samples' mean verifier pass rate, pairs built, verifier-passing samples
    the quality gate rejected, the round's loss and reward margin."""
    out = {"pass_rate": float(verified["pass_rate"].mean()) if len(verified) else math.nan,
           "samples": float(len(verified)), "pairs": float(pairs), "gate_rejected": float(gate_in - gate_kept)}
    if model is not None and len(model):
        row = model.iloc[0]
        for k in ("train_loss", "reward_margin"):
            v = row[k]
            out[k] = float(v) if v is not None and v == v else math.nan
    return out
