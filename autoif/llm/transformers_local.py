"""In-process transformers engine: the policy of stage C (a small HF model, optionally with a peft adapter).

Behind the one LLM interface (``generate(prompts, n, temperature, max_tokens, seed, json_schema)``) like every
other engine. Each prompt is sent as one user turn through the tokenizer's chat template
(``add_generation_prompt=True``), tokenized without extra special tokens (what TRL's trainers and vLLM's chat
endpoint do, so training, this engine and a vLLM server all see the same prompt tokens). Prompts run in batches
of ``batch_size``, left-padded, through ``model.generate``; ``n`` completions per prompt are
``num_return_sequences=n`` (greedy: one decode, copied ``n`` times, as the HTTP engine does).

- ``temperature == 0``: greedy. Otherwise sampling at that temperature; ``top_k``/``top_p`` are what the model's
  ``generation_config.json`` says, else off (not transformers' fallback ``top_k=50``): vLLM's server samples the
  same way by default.
- ``seed``: each batch runs under ``torch.manual_seed(seed + first_prompt_index * n)`` inside
  ``torch.random.fork_rng`` (the caller's global RNG is left as it was). The same call (prompts, ``n``,
  ``batch_size``, seed) gives the same texts; a prompt's samples depend on the batch it ran in (one RNG per
  batch), unlike the servers' per-request seeds. ``seed=None``: whatever the global RNG gives.
- ``json_schema`` is ignored: there is no constrained decoding here (the policy is sampled for free text; a step
  that needs JSON parses the text and drops what does not parse).
- Decoded text is the completion only: the prompt and special tokens are cut.

One model load per :class:`LoadedModel`; engines built by :func:`autoif.policy.policy_llm` share one loaded model
per weights digest, each with its own ``usage``. Calls on one model are serialized (a lock).

Errors: torch/transformers/peft missing or the model/adapter not loadable -> :class:`LLMSetupError`; a prompt
whose tokens plus ``max_tokens`` exceed the model's context (``max_position_embeddings``) ->
:class:`LLMContextOverflowError` for that prompt (the other prompts still run; their completions ride on the
error's ``outcomes``); anything else torch raises while generating -> :class:`LLMError`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from autoif.llm import Usage, count
from autoif.llm.errors import DETAIL_CHARS, LLMContextOverflowError, LLMError, LLMRequestError, LLMSetupError

# A model without a chat template gets autoif.policy.PLAIN_CHAT_TEMPLATE (kept there; imported lazily).


@dataclass
class LoadedModel:
    """A model + tokenizer on a device, ready to generate; shared by the engines that use the same weights."""

    model: Any
    tokenizer: Any
    device: str
    eos_ids: frozenset[int]
    max_positions: int | None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        adapter_dir: str | Path | None = None,
        device: str = "cpu",
        dtype: Any = None,
        tokenizer_dir: str | Path | None = None,
    ) -> LoadedModel:
        """Load ``model_dir`` (a HF causal LM dir) and, when given, merge the peft adapter in ``adapter_dir``.
        The tokenizer is ``model_dir``'s, or ``tokenizer_dir``'s when ``model_dir`` has none (a full fine-tune
        saved without its tokenizer)."""
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise LLMSetupError("the transformers policy engine needs torch and transformers: "
                                "pip install 'autoif-flow[train]'") from e
        from autoif.policy import PLAIN_CHAT_TEMPLATE

        model_dir = Path(model_dir)
        try:
            has_tok = (model_dir / "tokenizer_config.json").is_file() or (model_dir / "tokenizer.json").is_file()
            tok = AutoTokenizer.from_pretrained(str(model_dir if has_tok or tokenizer_dir is None else tokenizer_dir))
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype or torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise LLMSetupError(f"transformers cannot load the model in {model_dir}: {type(e).__name__}: {e}") from e
        if adapter_dir is not None:
            try:
                from peft import PeftModel
            except ImportError as e:
                raise LLMSetupError("a policy adapter needs peft: pip install 'autoif-flow[train]'") from e
            try:
                # Merged: generation then costs what the base costs (no per-layer LoRA matmuls).
                model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise LLMSetupError(f"peft cannot load the adapter in {adapter_dir} onto {model_dir}: "
                                    f"{type(e).__name__}: {e}") from e
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if not tok.chat_template:
            tok.chat_template = PLAIN_CHAT_TEMPLATE
        tok.padding_side = "left"  # decoder-only batched generation: prompts end where generation starts
        try:
            model = model.to(device)
        except RuntimeError as e:
            raise LLMSetupError(f"cannot move the model in {model_dir} to {device}: {e}") from e
        model.eval()
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        eos = set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]) | {tok.eos_token_id}
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_positions is None and hasattr(model.config, "get_text_config"):
            max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        return cls(model=model, tokenizer=tok, device=device, eos_ids=frozenset(i for i in eos if i is not None),
                   max_positions=max_positions)


class TransformersLLM:
    """The LLM interface over an in-process transformers model (see the module docstring)."""

    def __init__(
        self,
        model_dir: str | Path,
        adapter_dir: str | Path | None = None,
        device: str = "cpu",
        dtype: Any = None,
        batch_size: int = 8,
        identity: str | None = None,
        loaded: LoadedModel | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_dir = Path(model_dir)
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self._identity = identity
        self._loaded = loaded
        self._load_lock = threading.Lock()
        self.usage = Usage()

    @property
    def identity(self) -> str:
        if self._identity is not None:
            return self._identity
        return f"transformers:{self.model_dir}" + (f"+{self.adapter_dir}" if self.adapter_dir is not None else "")

    @property
    def loaded(self) -> LoadedModel:
        """The model, loaded on first use."""
        with self._load_lock:
            if self._loaded is None:
                self._loaded = LoadedModel.load(self.model_dir, self.adapter_dir, self.device, self.dtype)
            return self._loaded

    def prompt_ids(self, prompt: str) -> list[int]:
        """The token ids the model sees for ``prompt``: one user turn through the chat template with the
        generation prompt, no special tokens added beyond the template's (as TRL and vLLM's chat endpoint)."""
        tok = self.loaded.tokenizer
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        temperature: float = 0.0,
        max_tokens: int = 512,
        seed: int | None = None,
        json_schema: dict | None = None,  # ignored: no constrained decoding in this engine
    ) -> list[list[str]]:
        if n < 1 or max_tokens < 1 or temperature < 0:
            raise LLMError(f"bad sampling parameters: n={n}, max_tokens={max_tokens}, temperature={temperature}")
        prompts = list(prompts)
        if not prompts:
            return []
        lm = self.loaded
        count(self.usage, prompts=len(prompts))
        encoded = [self.prompt_ids(p) for p in prompts]
        out: list[list[str] | LLMRequestError] = [[] for _ in prompts]
        runnable: list[int] = []
        for i, ids in enumerate(encoded):
            if lm.max_positions is not None and len(ids) + max_tokens > lm.max_positions:
                count(self.usage, error="prompt_too_long")
                out[i] = LLMContextOverflowError(
                    f"transformers on {self.model_dir.name}: prompt of {len(ids)} tokens + max_tokens {max_tokens} "
                    f"exceed the model's maximum context length of {lm.max_positions}", prompt_index=i)
            else:
                runnable.append(i)
        with lm.lock:
            for b in range(0, len(runnable), self.batch_size):
                batch = runnable[b:b + self.batch_size]
                texts = self._batch(lm, [encoded[i] for i in batch], n, temperature, max_tokens,
                                    None if seed is None else seed + batch[0] * n)
                for i, t in zip(batch, texts):
                    out[i] = t
        failed = [o for o in out if isinstance(o, LLMRequestError)]
        if failed:
            failed[0].outcomes = out
            raise failed[0]
        return out  # type: ignore[return-value]  # no LLMRequestError in it

    def _batch(
        self, lm: LoadedModel, batch: list[list[int]], n: int, temperature: float, max_tokens: int, seed: int | None
    ) -> list[list[str]]:
        import torch

        tok = lm.tokenizer
        width = max(len(ids) for ids in batch)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], dtype=torch.long, device=lm.device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], dtype=torch.long, device=lm.device)
        sample = temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": pad, "do_sample": sample}
        if sample:
            # Plain temperature sampling unless the model's generation_config.json sets top_k (transformers
            # would otherwise fill in top_k=50; vLLM applies no top-k unless the model's config names one).
            model_top_k = getattr(lm.model.generation_config, "top_k", None)
            kwargs.update(temperature=float(temperature), num_return_sequences=n, top_k=model_top_k or 0)
        else:  # unset sampling knobs the model's generation_config may carry (they warn under greedy)
            kwargs.update(temperature=None, top_p=None, top_k=None)
        count(self.usage, requests=1)
        try:
            with torch.random.fork_rng(devices=[lm.device] if lm.device.startswith("cuda") else []), torch.inference_mode():
                if seed is not None:
                    torch.manual_seed(seed)
                seqs = lm.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        except Exception as e:  # torch/transformers raise RuntimeError, ValueError, CUDA OOM...: an engine failure
            count(self.usage, error=type(e).__name__)
            raise LLMError(f"transformers generate on {self.model_dir.name}: {type(e).__name__}: {str(e)[:DETAIL_CHARS]}") from e
        gen = seqs[:, width:].tolist()
        per_prompt = n if sample else 1
        result: list[list[str]] = []
        for k, ids in enumerate(batch):
            rows = [self._until_eos(lm, g) for g in gen[k * per_prompt:(k + 1) * per_prompt]]
            texts = [tok.decode(r, skip_special_tokens=True) for r in rows]
            # What was decoded (greedy: one completion, copied n times), as the HTTP engine counts it.
            count(self.usage, completions=len(rows), prompt_tokens=len(ids), completion_tokens=sum(len(r) for r in rows))
            result.append(texts if sample else texts * n)
        return result

    @staticmethod
    def _until_eos(lm: LoadedModel, ids: list[int]) -> list[int]:
        """The generated tokens up to and including the first end-of-sequence token (the rest is padding)."""
        for j, t in enumerate(ids):
            if t in lm.eos_ids:
                return ids[:j + 1]
        return ids

    def close(self) -> None:
        """Drop this engine's reference to the model (others sharing it keep theirs)."""
        with self._load_lock:
            self._loaded = None
