"""The policy behind the LLM interface (autoif.policy.policy_llm, engine transformers) and its weights as bytes.

A tiny random-weight Qwen2 (tests/tiny_models.py) stands for the base; adapters are peft LoRA adapters with
random non-zero B (tests/vllm_lora.py), so the adapted model provably computes something else. The texts are
noise; the tests check shapes, determinism, the adapter's effect, usage counting and the archive's safety.
"""
from __future__ import annotations

import io
import time
import zipfile

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from autoif.config import PolicyConfig  # noqa: E402
from autoif.llm import LLMContextOverflowError, generate_each, usage_scope  # noqa: E402
from autoif.policy import (  # noqa: E402
    base_model_dir,
    clear_policy_cache,
    pack_weights,
    policy_llm,
    unpack_weights,
    weights_digest,
)
from tests.tiny_models import build_tiny_qwen2  # noqa: E402
from tests.vllm_lora import perturbed_lora_adapter  # noqa: E402

PROMPTS = ["Write a short story about a robot.", "Answer in lowercase letters only.", "Explain why the sky is blue."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    model = build_tiny_qwen2(root / "tiny-qwen2")
    adapter = perturbed_lora_adapter(model, root / "adapter", seed=1)
    yield {"root": root, "model": model, "adapter": pack_weights(adapter)}
    clear_policy_cache()


def _policy(tiny, **kw) -> PolicyConfig:
    return PolicyConfig(model="tiny-qwen2", model_path=str(tiny["model"]), device="cpu",
                        adapter_root=str(tiny["root"] / "adapters"), **kw)


def test_base_generates_n_per_prompt_and_greedy_is_reproducible(tiny):
    llm = policy_llm(_policy(tiny, batch_size=2))
    out = llm.generate(PROMPTS, n=3, temperature=0.0, max_tokens=12)
    assert [len(o) for o in out] == [3, 3, 3]
    assert all(isinstance(t, str) for o in out for t in o)
    assert all(len(set(o)) == 1 for o in out)  # greedy: n copies of one decode
    assert out == policy_llm(_policy(tiny, batch_size=3)).generate(PROMPTS, n=3, temperature=0.0, max_tokens=12)


def test_seed_reproduces_sampling_and_other_seed_differs(tiny):
    llm = policy_llm(_policy(tiny, batch_size=2))
    run = lambda seed: llm.generate(PROMPTS, n=3, temperature=1.0, max_tokens=16, seed=seed)  # noqa: E731
    first, again, other = run(7), run(7), run(8)
    assert first == again
    assert first != other
    assert [len(o) for o in first] == [3, 3, 3]
    assert all(len(set(o)) > 1 for o in first)  # sampled, not copies


def test_sampling_leaves_the_global_rng_alone(tiny):
    import torch

    llm = policy_llm(_policy(tiny))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    llm.generate(PROMPTS[:1], n=2, temperature=1.0, max_tokens=4, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_completion_excludes_prompt_and_special_tokens(tiny):
    llm = policy_llm(_policy(tiny))
    for text in llm.generate(PROMPTS, n=2, temperature=1.0, max_tokens=24, seed=0)[0]:
        assert "<|im_start|>" not in text and "<|im_end|>" not in text and "<|endoftext|>" not in text
        assert PROMPTS[0] not in text


def test_prompt_is_the_chat_template_user_turn(tiny):
    llm = policy_llm(_policy(tiny))
    tok = llm.loaded.tokenizer
    text = tok.decode(llm.prompt_ids("hello there"))
    assert text == "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"


def test_a_model_without_chat_template_gets_the_plain_one_with_bos(tiny, tmp_path):
    import json
    import shutil

    d = tmp_path / "no-template"
    shutil.copytree(tiny["model"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    cfg["bos_token"] = "<|endoftext|>"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in d.glob("chat_template.*"):
        f.unlink()
    llm = policy_llm(PolicyConfig(model="plain", model_path=str(d), device="cpu"))
    tok = llm.loaded.tokenizer
    ids = llm.prompt_ids("hello there")
    assert ids[0] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.decode(ids[1:]) == "User: hello there\nAssistant: "
    assert len(llm.generate(["hello"], n=2, max_tokens=4)[0]) == 2


def test_adapter_changes_greedy_output(tiny):
    base = policy_llm(_policy(tiny)).generate(PROMPTS, temperature=0.0, max_tokens=16)
    adapted_llm = policy_llm(_policy(tiny), tiny["adapter"])
    adapted = adapted_llm.generate(PROMPTS, temperature=0.0, max_tokens=16)
    assert adapted != base
    assert adapted == adapted_llm.generate(PROMPTS, temperature=0.0, max_tokens=16)
    assert adapted_llm.identity != policy_llm(_policy(tiny)).identity
    assert weights_digest(tiny["adapter"]) in adapted_llm.identity


def test_engines_share_one_loaded_model_per_weights(tiny):
    a = policy_llm(_policy(tiny), tiny["adapter"])
    b = policy_llm(_policy(tiny), tiny["adapter"])
    assert a.loaded is b.loaded  # one load per process
    assert a.usage is not b.usage  # each engine counts its own calls
    assert policy_llm(_policy(tiny)).loaded is not a.loaded


def test_full_model_weights_are_loaded_as_the_model(tiny):
    import torch
    from transformers import AutoModelForCausalLM

    full = tiny["root"] / "full"
    model = AutoModelForCausalLM.from_pretrained(str(tiny["model"]), dtype=torch.float32)
    with torch.no_grad():
        torch.manual_seed(3)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(full))  # no tokenizer files: the engine takes the base's
    blob = pack_weights(full)
    llm = policy_llm(_policy(tiny), blob)
    assert llm.adapter_dir is None and llm.model_dir.name == weights_digest(blob)
    out = llm.generate(PROMPTS, temperature=0.0, max_tokens=16)
    assert out != policy_llm(_policy(tiny)).generate(PROMPTS, temperature=0.0, max_tokens=16)


def test_usage_counts_into_engine_and_scope(tiny):
    llm = policy_llm(_policy(tiny, batch_size=2))
    with usage_scope() as scope:
        out = llm.generate(PROMPTS, n=2, temperature=1.0, max_tokens=8, seed=1)
    u = llm.usage
    assert (u.requests, u.prompts, u.completions) == (2, 3, 6)  # 2 batches of <= 2 prompts
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 6 * 8
    assert scope.as_dict() == u.as_dict()
    assert len(out) == 3


def test_too_long_prompt_is_that_prompts_reason(tiny):
    llm = policy_llm(_policy(tiny))
    long_prompt = "the quick brown fox " * 600  # far past the tiny model's 2048 positions
    gens = generate_each(llm, [PROMPTS[0], long_prompt], n=2, temperature=0.0, max_tokens=4)
    assert gens.errors == [None, "prompt_too_long"]
    assert gens.texts[0] is not None and len(gens.texts[0]) == 2 and gens.texts[1] is None
    with pytest.raises(LLMContextOverflowError):
        llm.generate([long_prompt], max_tokens=4)
    assert llm.usage.errors.get("prompt_too_long", 0) >= 2


def test_pack_unpack_round_trip_and_idempotent(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_text('{"r": 8}')
    (src / "sub" / "w.bin").write_bytes(bytes(range(256)))
    blob = pack_weights(src)
    assert blob == pack_weights(src)  # deterministic
    out = unpack_weights(blob, tmp_path / "root")
    assert out.name == weights_digest(blob)
    assert (out / "adapter_config.json").read_text() == '{"r": 8}'
    assert (out / "sub" / "w.bin").read_bytes() == bytes(range(256))
    assert unpack_weights(blob, tmp_path / "root") == out


@pytest.mark.parametrize("bad_name", ["../escape.txt", "sub/../../escape.txt", "/abs/escape.txt"])
def test_unpack_rejects_entries_escaping_the_directory(tmp_path, bad_name):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("adapter_config.json", "{}")
        z.writestr(bad_name, "evil")
    root = tmp_path / "root"
    with pytest.raises(ValueError, match="outside"):
        unpack_weights(buf.getvalue(), root)
    assert not (tmp_path / "escape.txt").exists() and not (root / "escape.txt").exists()
    assert list(root.iterdir()) == []  # the half-unpacked temp dir is gone too


def test_unpack_rejects_a_sibling_dir_sharing_the_temp_prefix(tmp_path, monkeypatch):
    """A string-prefix check would let ``../<tmpname>X/f`` through: the check compares paths."""
    import tempfile as tempfile_mod

    root = tmp_path / "root"
    root.mkdir()
    fixed = root / "fixed.tmp"
    monkeypatch.setattr(tempfile_mod, "mkdtemp", lambda dir, prefix: (fixed.mkdir(), str(fixed))[1])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../fixed.tmpX/f", "evil")
    with pytest.raises(ValueError, match="outside"):
        unpack_weights(buf.getvalue(), root)


def test_vllm_engine_without_base_url_is_a_setup_error(tiny):
    from autoif.llm import LLMSetupError

    with pytest.raises(LLMSetupError, match="base_url"):
        policy_llm(_policy(tiny, engine="vllm"), tiny["adapter"])


def test_tiny_throughput(tiny, capsys):
    llm = policy_llm(_policy(tiny, batch_size=8))
    llm.generate(PROMPTS[:1], max_tokens=2)  # warm-up
    t0 = time.perf_counter()
    llm.generate(PROMPTS * 3, n=2, temperature=1.0, max_tokens=32, seed=0)
    dt = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n[tiny qwen2] {llm.usage.completion_tokens} completion tokens in {dt:.2f} s: "
              f"{llm.usage.completion_tokens / dt:.0f} tokens/s")
    assert llm.usage.completion_tokens > 0


@pytest.mark.slow
def test_embedded_gemma_converts_once_and_generates(capsys):
    """The default policy (the embedded gemma3-270m GGUF) as a HF dir (about 45 s the first time), sampled."""
    pytest.importorskip("gguf")
    policy = PolicyConfig(device="cpu", batch_size=2)
    t0 = time.perf_counter()
    d = base_model_dir(policy)
    convert_s = time.perf_counter() - t0
    assert (d / "config.json").is_file() and base_model_dir(policy) == d
    llm = policy_llm(policy)
    assert llm.prompt_ids("hi")[0] == llm.loaded.tokenizer.bos_token_id  # gemma writes garbage without <bos>
    out = llm.generate(["The capital of France is", "List three fruits."], n=2, temperature=0.0, max_tokens=8)
    assert [len(o) for o in out] == [2, 2] and all(isinstance(t, str) for o in out for t in o)
    before = llm.usage.completion_tokens
    t1 = time.perf_counter()
    sampled = llm.generate(["Write one sentence about rain.", "Count to five."], n=2, temperature=1.0, max_tokens=16, seed=0)
    dt = time.perf_counter() - t1
    tokens = llm.usage.completion_tokens - before
    with capsys.disabled():
        print(f"\n[gemma3-270m] HF dir ready in {convert_s:.1f} s; sampled {tokens} tokens in {dt:.2f} s: "
              f"{tokens / dt:.1f} tokens/s; greedy {out!r:.200}; sampled {sampled!r:.200}")
    assert tokens > 0
