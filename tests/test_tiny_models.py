"""The tiny locally built models load offline with transformers, and building them twice is a no-op."""
import json

import pytest

from tests.tiny_models import NLI_LABELS, build_tiny_nli_classifier, build_tiny_qwen2


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_tiny_qwen2(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture(scope="module")
def nli_dir(tmp_path_factory):
    return build_tiny_nli_classifier(tmp_path_factory.mktemp("models") / "tiny-nli")


def _size(d):
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def test_tiny_qwen2_loads_chats_and_generates(qwen_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert _size(qwen_dir) < 5_000_000
    tok = AutoTokenizer.from_pretrained(qwen_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(qwen_dir, local_files_only=True)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    cfg = model.config
    assert cfg.hidden_size // cfg.num_attention_heads == 64  # vLLM on CPU rejects head_dim 16
    assert len(tok) <= cfg.vocab_size
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id == [tok.eos_token_id, tok.pad_token_id]

    text = 'Answer in JSON: {"answer": "yes", "score": 7} and def evaluate(response): ...'
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level BPE round-trips anything

    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_tiny_qwen2_is_seeded_and_idempotent(qwen_dir, tmp_path):
    marker = qwen_dir / "autoif_tiny_model.json"
    weights = qwen_dir / "model.safetensors"
    before = (marker.stat().st_mtime_ns, weights.stat().st_mtime_ns)
    assert build_tiny_qwen2(qwen_dir) == qwen_dir
    assert (marker.stat().st_mtime_ns, weights.stat().st_mtime_ns) == before  # complete: left alone

    again = build_tiny_qwen2(tmp_path / "again")  # same seed -> same weights
    assert (again / "model.safetensors").read_bytes() == weights.read_bytes()

    other = build_tiny_qwen2(tmp_path / "again", seed=1)  # different params -> rebuilt in place
    assert json.loads((other / "autoif_tiny_model.json").read_text())["seed"] == 1
    assert (other / "model.safetensors").read_bytes() != weights.read_bytes()


def test_partial_dir_is_rebuilt(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")  # a killed build: no marker
    build_tiny_qwen2(d)
    assert (d / "model.safetensors").is_file() and (d / "autoif_tiny_model.json").is_file()


def test_head_dim_other_than_64_is_refused(tmp_path):
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_qwen2(tmp_path / "m", hidden_size=64, num_attention_heads=4)


def test_tiny_nli_classifier_is_nli_shaped(nli_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(nli_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(nli_dir, local_files_only=True)
    assert model.config.id2label == NLI_LABELS
    assert model.config.label2id["contradiction"] == 2
    enc = tok(["a man plays a guitar", "the cat sleeps"], ["a person plays music", "the cat runs"], padding=True, return_tensors="pt")
    assert tok.decode(enc["input_ids"][0], skip_special_tokens=False).startswith("[CLS] a man plays a guitar [SEP]")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (2, 3)
    assert {model.config.id2label[int(i)] for i in logits.argmax(-1)} <= set(NLI_LABELS.values())
