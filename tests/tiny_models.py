"""Tiny models built locally, with random weights: for tests, never for data.

Nothing here downloads. :func:`build_tiny_qwen2` writes a ``Qwen2ForCausalLM`` (under 1 MB) with a byte-level
BPE tokenizer trained in a moment on built-in text and a ChatML chat template: it loads with
``transformers`` offline, serves in vLLM (CPU) and trains with trl. :func:`build_tiny_nli_classifier` writes an
NLI-shaped sequence classifier (labels entailment / neutral / contradiction). Both are idempotent: a complete
output dir built with the same parameters is left alone; a partial one is rebuilt (outputs are written to a
temp dir and renamed into place, so a killed build never looks complete).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

_MARKER = "autoif_tiny_model.json"

# Chat tokens follow Qwen2's ChatML so prompts look like a real Qwen2 chat model's.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

NLI_LABELS = {0: "entailment", 1: "neutral", 2: "contradiction"}

# Built-in training text for the tokenizers: instruction-following prose, JSON and a little Python, so the
# merges cover what the tests send.
_CORPUS = """\
Write a short story about a robot who learns to paint. Your answer must contain exactly three paragraphs.
Answer in lowercase letters only, and do not use any commas in your response.
Please respond in JSON format with the keys "answer" and "score". The score is an integer between 0 and 10.
Give two different responses. Responses and only responses should be separated by six asterisk symbols.
Highlight at least two sections of your answer with markdown, for example *highlighted section*.
The response must end with the phrase "Is there anything else I can help with?" and nothing after it.
Instruction: the response should be less than 100 words. Query: explain why the sky is blue.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
User: what is the capital of France? Assistant: The capital of France is Paris.
def evaluate(response):
    return len(response.split()) < 100
def evaluate(response: str) -> bool:
    words = response.lower().split()
    return all(w.isalpha() for w in words) and "," not in response
{"answer": "yes", "score": 7, "cases": [{"input": "hello world", "output": true}]}
{"func": "def evaluate(response):\\n    return response.isupper()", "cases": [{"input": "ABC", "output": false}]}
Premise: a man is playing a guitar on stage. Hypothesis: a person plays music. Label: entailment.
Premise: the cat sleeps. Hypothesis: the cat is running. Label: contradiction. Neutral otherwise.
0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14 yes no true false null [ ] { } ( ) : ; , . ! ? - _ = + * / # @ % &
"""


def _complete(out_dir: Path, params: dict[str, Any]) -> bool:
    marker = out_dir / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == params
    except (OSError, ValueError):
        return False


def _build_atomically(out_dir: Path, params: dict[str, Any], write: Callable[[Path], None]) -> Path:
    """Write into a temp dir beside ``out_dir``, drop the marker last, then swap it into place."""
    out_dir = Path(out_dir).expanduser().resolve()
    if _complete(out_dir, params):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write(tmp)
        (tmp / _MARKER).write_text(json.dumps(params, sort_keys=True))
        if out_dir.exists():
            if _complete(out_dir, params):  # another process finished first
                return out_dir
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _portable_tokenizer_config(d: Path, chat_template: str | None = None) -> None:
    """transformers 5 writes ``tokenizer_class: TokenizersBackend``, which the transformers 4.x inside a vLLM
    env does not know: name the class both read, and keep the chat template inline as well."""
    path = d / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _corpus(repeat: int = 20) -> list[str]:
    return _CORPUS.splitlines() * repeat


def _train_bytelevel_bpe(vocab_size: int, special_tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def build_tiny_qwen2(
    out_dir: str | Path,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 1,
    num_key_value_heads: int = 1,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    """A random-weight Qwen2 causal LM + byte-level BPE tokenizer + ChatML template in ``out_dir``.

    ``hidden_size / num_attention_heads`` is the head dim and must be 64 (vLLM's CPU attention does not take
    16). Returns the resolved model dir.
    """
    if hidden_size % num_attention_heads or hidden_size // num_attention_heads != 64:
        raise ValueError(f"head_dim must be 64 (vLLM on CPU), got {hidden_size}/{num_attention_heads}")
    if vocab_size < 256 + 3:
        raise ValueError(f"vocab_size must hold the 256 byte tokens and 3 specials, got {vocab_size}")
    params = {
        "kind": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "max_position_embeddings": max_position_embeddings,
        "seed": seed,
        "format": 1,
    }

    def write(d: Path) -> None:
        import torch
        from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

        specials = [ENDOFTEXT, IM_START, IM_END]
        tok = PreTrainedTokenizerFast(
            tokenizer_object=_train_bytelevel_bpe(vocab_size, specials),
            eos_token=IM_END,
            pad_token=ENDOFTEXT,
            model_max_length=max_position_embeddings,
            chat_template=CHATML_TEMPLATE,
        )
        tok.padding_side = "left"  # decoder-only generation pads on the left
        ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
        config = Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=True,
            bos_token_id=ids[ENDOFTEXT],
            eos_token_id=ids[IM_END],
            pad_token_id=ids[ENDOFTEXT],
        )
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
        model.generation_config = GenerationConfig(
            bos_token_id=ids[ENDOFTEXT],
            eos_token_id=[ids[IM_END], ids[ENDOFTEXT]],
            pad_token_id=ids[ENDOFTEXT],
            do_sample=False,
        )
        model.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        _portable_tokenizer_config(d, chat_template=CHATML_TEMPLATE)

    return _build_atomically(Path(out_dir), params, write)


def build_tiny_nli_classifier(
    out_dir: str | Path,
    vocab_size: int = 400,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    intermediate_size: int = 64,
    seed: int = 0,
) -> Path:
    """A random-weight ``BertForSequenceClassification`` with NLI labels and a WordPiece tokenizer that
    encodes (premise, hypothesis) pairs as ``[CLS] a [SEP] b [SEP]``. Its verdicts are noise: it exercises
    the NLI code path (loading, pair encoding, label lookup), not its judgement."""
    params = {
        "kind": "bert-nli",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "intermediate_size": intermediate_size,
        "seed": seed,
        "format": 1,
    }

    def write(d: Path) -> None:
        import torch
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
        from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        wp.normalizer = normalizers.BertNormalizer(lowercase=True)
        wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        wp.decoder = decoders.WordPiece()
        wp.train_from_iterator(
            _corpus(), trainer=trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
        )
        cls_id, sep_id = wp.token_to_id("[CLS]"), wp.token_to_id("[SEP]")
        wp.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        tok = PreTrainedTokenizerFast(
            tokenizer_object=wp,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_max_length=512,
        )
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=512,
            num_labels=len(NLI_LABELS),
            id2label=dict(NLI_LABELS),
            label2id={v: k for k, v in NLI_LABELS.items()},
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(seed)
        BertForSequenceClassification(config).save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        _portable_tokenizer_config(d)

    return _build_atomically(Path(out_dir), params, write)


if __name__ == "__main__":  # python -m tests.tiny_models DIR [nli]
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "tiny-qwen2"
    builder = build_tiny_nli_classifier if sys.argv[2:3] == ["nli"] else build_tiny_qwen2
    print(builder(target))
