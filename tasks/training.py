"""AutoIF step 9: SFT, then offline DPO from the SFT adapter, with TRL and peft (plain functions of frames).

A trained model is one :class:`~autoif.schemas.training.TrainedModels` row: its weights (the adapter, or the
full model, as a zip blob), what it started from, and TRL's training summary. TRL's own MLflow callback logs
the run when the runtime says ``report_to="mlflow"``; nothing here imports MLflow.
"""
from __future__ import annotations

import io
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from autoif.config import RunConfig, TrainMethod
from autoif.policy import base_identity, load_base, pack_weights, train_flags, unpack_weights, weights_digest

COLUMNS = ["model_id", "method", "iteration", "base_model", "base_identity", "parent", "is_adapter", "train_rows", "steps",
           "train_loss", "reward_margin", "seconds", "log_history", "weights", "weights_digest", "reason"]


def _conversation(value: Any) -> list[dict[str, str]]:
    """A conversation cell as read back from Parquet (an array of dicts) as plain Python."""
    return [{"role": str(t["role"]), "content": str(t["content"])} for t in list(value)]


def _finite(v: Any) -> Any:
    return v if not isinstance(v, float) or math.isfinite(v) else None


def _last(history: list[dict], name: str) -> float | None:
    values = [h[name] for h in history if name in h and _finite(h[name]) is not None]
    return float(values[-1]) if values else None


def _row(model_id: str, method: str, cfg: RunConfig, parent: str, out_dir: Path, trainer: Any, rows: int,
         seconds: float, iteration: int = 0) -> pd.DataFrame:
    history = [{k: _finite(v) for k, v in h.items()} for h in trainer.state.log_history]
    blob = pack_weights(out_dir)
    return pd.DataFrame([{
        "model_id": model_id, "method": method, "iteration": iteration, "base_model": cfg.policy.model,
        "base_identity": base_identity(cfg.policy), "parent": parent, "is_adapter": cfg.train.method is TrainMethod.lora,
        "train_rows": rows, "steps": int(trainer.state.global_step), "train_loss": _last(history, "train_loss"),
        "reward_margin": _last(history, "rewards/margins"), "seconds": round(seconds, 3),
        "log_history": json.dumps(history), "weights": blob, "weights_digest": weights_digest(blob), "reason": None,
    }], columns=COLUMNS)


def _save(trainer: Any, tokenizer: Any, out_dir: Path) -> None:
    """The adapter (LoRA) or the whole model with its tokenizer (full fine-tuning)."""
    trainer.model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def _start(cfg: RunConfig, init: pd.DataFrame | None, trainable: bool = True) -> tuple[Any, Any, str]:
    """(model, tokenizer, parent id): the base with the init model's weights (an adapter kept trainable, or a
    full model), or the base alone for an empty ``init``."""
    model, tok = load_base(cfg.policy)
    if init is None or not len(init):
        return model, tok, "base"
    row = init.iloc[0]
    d = unpack_weights(bytes(row["weights"]))
    if bool(row["is_adapter"]):
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(d), is_trainable=trainable), tok, str(row["model_id"])
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(d)).to(model.device), tok, str(row["model_id"])


def train_sft(sft: pd.DataFrame, cfg: RunConfig, seed: int, report_to: str = "none") -> pd.DataFrame:
    """SFT (``trl.SFTTrainer``) on the TRL conversational export: LoRA from ``train.lora`` or full fine-tuning."""
    from datasets import Dataset
    from trl import SFTTrainer

    rows = sft.head(cfg.train.max_sft_rows) if cfg.train.max_sft_rows else sft
    ds = Dataset.from_list([{"messages": _conversation(m)} for m in rows["messages"]])
    model, tok, parent = _start(cfg, None)
    with tempfile.TemporaryDirectory() as tmp:
        args = cfg.train.sft_args(str(Path(tmp) / "run"), seed=seed, report_to=report_to, save_strategy="no",
                                  **train_flags(cfg.policy))
        started = time.monotonic()
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                             peft_config=cfg.train.peft_config())
        trainer.train()
        out = Path(tmp) / "weights"
        _save(trainer, tok, out)
        return _row("sft", "sft", cfg, parent, out, trainer, len(ds), time.monotonic() - started)


def dpo_dataset(frame: pd.DataFrame, limit: int | None = None) -> Any:
    """TRL's conversational preference rows (prompt / chosen / rejected) from the export or from DPO pairs."""
    from datasets import Dataset

    rows = frame.head(limit) if limit else frame

    def turns(v: Any, role: str) -> list[dict[str, str]]:
        return [{"role": role, "content": v}] if isinstance(v, str) else _conversation(v)

    return Dataset.from_list([{"prompt": turns(r.prompt, "user"), "chosen": turns(r.chosen, "assistant"),
                               "rejected": turns(r.rejected, "assistant")} for r in rows.itertuples()])


def train_dpo(dpo: pd.DataFrame, init: pd.DataFrame, cfg: RunConfig, seed: int, report_to: str = "none",
              model_id: str = "dpo", method: str = "dpo", iteration: int = 0,
              overrides: dict[str, Any] | None = None) -> pd.DataFrame:
    """Offline DPO (``trl.DPOTrainer``, sigmoid loss from config) that keeps training the init model's adapter;
    the reference is a frozen copy of the init policy (so the KL anchor is the SFT model, and the adapter still
    applies to the plain base). An empty ``init`` starts a fresh LoRA on the base."""
    from trl import DPOTrainer

    ds = dpo_dataset(dpo, cfg.train.max_dpo_pairs)
    model, tok, parent = _start(cfg, init)
    ref = None
    if parent != "base":
        ref, _, _ = _start(cfg, init, trainable=False)
        if hasattr(ref, "merge_and_unload"):  # TRL runs the reference as a plain model
            ref = ref.merge_and_unload()
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    fresh_lora = parent == "base" and cfg.train.method is TrainMethod.lora
    with tempfile.TemporaryDirectory() as tmp:
        args = cfg.train.dpo_args(str(Path(tmp) / "run"), seed=seed, report_to=report_to, save_strategy="no",
                                  **{**(overrides or {}), **train_flags(cfg.policy)})
        started = time.monotonic()
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok,
                             peft_config=cfg.train.peft_config() if fresh_lora else None)
        trainer.train()
        out = Path(tmp) / "weights"
        _save(trainer, tok, out)
        return _row(model_id, method, cfg, parent, out, trainer, len(ds), time.monotonic() - started, iteration)


def adapter_tensors(weights: bytes) -> dict[str, Any]:
    """The tensors of a packed adapter (tests and benchmarks compare them across training steps)."""
    from safetensors.torch import load

    import zipfile

    with zipfile.ZipFile(io.BytesIO(weights)) as z:
        name = next(n for n in z.namelist() if n.endswith(".safetensors"))
        return load(z.read(name))


# --- step 10, the GRPO alternative: the sandboxed verifiers as TRL's reward function -----------------------


def _completion_text(completion: Any) -> str:
    """A TRL completion as the plain text the verifiers read: a conversational completion's last message, or the
    string; stripped as the online samples are, a character UTF-8 cannot encode (a lone surrogate) as ``?``."""
    if isinstance(completion, (list, tuple)):
        completion = completion[-1].get("content") if completion and isinstance(completion[-1], dict) else ""
    text = completion if isinstance(completion, str) else ""
    return text.encode("utf-8", "replace").decode("utf-8").strip()


def verifier_reward(pairs: pd.DataFrame, cfg: Any, sandbox: Any) -> Any:
    """TRL's reward function for GRPO: a completion of the prompt of pair ``pair_id`` scores the pass rate of that
    pair's instruction's surviving verifier functions, computed by stage B's verification (``tasks.verification.verify``,
    in the sandbox; ``cfg``: its :class:`~autoif.config.VerificationConfig`). A function that errors, times out or
    returns a non-bool is a fail, so a malformed or hostile completion (or an empty one) only scores low; a pair
    without functions scores 0."""
    from autoif.tasks.response_generation import RESPONSE_COLUMNS
    from autoif.tasks.verification import verify

    by_pair = {str(r["pair_id"]): r for r in pairs.to_dict("records")}

    def verifier_pass_rate(prompts: list, completions: list, pair_id: list, **_: Any) -> list[float]:
        texts = [_completion_text(c) for c in completions]
        rows = [{**{k: by_pair[str(p)].get(k) for k in RESPONSE_COLUMNS if k not in ("reason", "response")},
                 "response_id": f"{p}-{k}", "response_index": k, "response": t}
                for k, (p, t) in enumerate(zip(pair_id, texts))]
        scored = verify(pd.DataFrame(rows, columns=RESPONSE_COLUMNS), cfg, sandbox)
        return [float(r) for r in scored["pass_rate"]]

    return verifier_pass_rate


def grpo_dataset(prompts: pd.DataFrame) -> Any:
    """TRL's conversational prompt-only rows (``prompt``: the user turn the policy is trained on, query then
    instruction as in the SFT and DPO data) with the ``pair_id`` the reward reads."""
    from datasets import Dataset
    from autoif.tasks.training_data import training_prompt

    return Dataset.from_list([{"prompt": [{"role": "user", "content": training_prompt(str(r.query), str(r.instruction))}],
                               "pair_id": str(r.pair_id)} for r in prompts.itertuples()])


def grpo_args(cfg: RunConfig, output_dir: str, overrides: dict[str, Any] | None = None, **runtime: Any) -> Any:
    """``trl.GRPOConfig`` of an online GRPO round: K (``online.samples_per_prompt``) completions per prompt at
    ``online.temperature``, at most ``online.max_new_tokens`` each, one prompt group per optimizer step
    (``per_device_train_batch_size`` = K unless a batch field is set), one pass over the prompts, a log line per step;
    ``online.grpo`` and then ``overrides`` over these; ``runtime`` (seed, report_to, device flags) over all."""
    from autoif.config import trl_args

    o = cfg.online
    values: dict[str, Any] = {**o.grpo, **(overrides or {})}
    derived: dict[str, Any] = {"num_generations": o.samples_per_prompt, "temperature": o.temperature,
                               "max_completion_length": o.max_new_tokens, "num_train_epochs": 1.0, "logging_steps": 1}
    if not {"per_device_train_batch_size", "generation_batch_size", "steps_per_generation"} & set(values):
        derived["per_device_train_batch_size"] = int(values.get("num_generations", o.samples_per_prompt))
    return trl_args("grpo", {**derived, **values}, output_dir, **runtime)


def train_grpo(prompts: pd.DataFrame, init: pd.DataFrame, cfg: RunConfig, seed: int, sandbox: Any,
               report_to: str = "none", model_id: str = "grpo", method: str = "grpo", iteration: int = 0,
               overrides: dict[str, Any] | None = None) -> pd.DataFrame:
    """One online GRPO round (``trl.GRPOTrainer``) on the training prompts (``prompts``: stage B's query pairs, the
    first ``online.max_prompts``): the policy samples K completions per prompt, :func:`verifier_reward` scores each
    in the sandbox, and the group-relative advantages train the init model's adapter (an empty ``init``: a fresh
    LoRA on the base). The KL anchor (``beta`` > 0 in ``online.grpo``; TRL's default 0 has none) is a frozen copy of
    the init adapter, made by TRL; only the trained adapter is saved. The sampling seed is ``seed + 1000 *
    iteration`` as for the DPO rounds' samples. ``reward_margin`` is None (no pairs); the per-step mean reward is
    TRL's ``reward`` in ``log_history``."""
    from autoif.tasks.online import training_prompts
    from trl import GRPOTrainer

    batch = training_prompts(prompts, cfg.online)
    ds = grpo_dataset(batch)
    model, tok, parent = _start(cfg, init)
    fresh_lora = parent == "base" and cfg.train.method is TrainMethod.lora
    with tempfile.TemporaryDirectory() as tmp:
        args = grpo_args(cfg, str(Path(tmp) / "run"), overrides, seed=seed + 1000 * iteration, report_to=report_to,
                         save_strategy="no", **train_flags(cfg.policy))
        started = time.monotonic()
        trainer = GRPOTrainer(model=model, reward_funcs=[verifier_reward(batch, cfg.verification, sandbox)], args=args,
                              train_dataset=ds, processing_class=tok,
                              peft_config=cfg.train.peft_config() if fresh_lora else None)
        trainer.train()
        out = Path(tmp) / "weights"
        from peft import PeftModel

        if isinstance(trainer.model, PeftModel):  # the trained adapter only, not TRL's frozen "ref" copy (beta > 0)
            trainer.model.save_pretrained(str(out), selected_adapters=["default"])
            tok.save_pretrained(str(out))
        else:
            _save(trainer, tok, out)
        return _row(model_id, method, cfg, parent, out, trainer, len(ds), time.monotonic() - started, iteration)


def grpo_summary(model: pd.DataFrame) -> dict[str, float]:
    """What one GRPO round did, from TRL's ``log_history``: the mean reward (= the verifier pass rate of the
    policy's samples: the only reward, weight 1) over the logged steps and at the last step, its within-group
    spread, the mean completion length, the round's loss and steps."""
    row = model.iloc[0]
    history = json.loads(row["log_history"])
    values = lambda k: [float(h[k]) for h in history if h.get(k) is not None]  # noqa: E731
    mean = lambda k: sum(values(k)) / len(values(k)) if values(k) else math.nan  # noqa: E731
    reward, loss = mean("reward"), row["train_loss"]
    return {"reward": reward, "pass_rate": reward, "reward_last": values("reward")[-1] if values("reward") else math.nan,
            "reward_std": mean("reward_std"), "completion_length": mean("completions/mean_length"),
            "train_loss": float(loss) if loss is not None and loss == loss else math.nan,
            "steps": float(row["steps"]), "prompts": float(row["train_rows"])}
