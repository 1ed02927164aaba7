"""Test helpers for the policy on a real vLLM CPU server with runtime LoRA (imported by the stage C tests).

- :class:`VLLMLoRAServer`: ``infra/vllm_server.sh`` started on a given port and model dir with
  ``--enable-lora --max-lora-rank 8`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; ``stop()`` takes the server
  and its engine-core children down (the script runs it under ``setsid``). Use it as a context manager or from a
  fixture; the vLLM venv is created by the script on first use (about 2-3 minutes, cached afterwards).
- :func:`tiny_vllm_model_dir`: the tiny Qwen2 dir ``infra/vllm_server.sh model`` builds (the one the server
  serves by default), so an adapter trained here fits the served base exactly.
- :func:`perturbed_lora_adapter`: a peft LoRA adapter on a model dir with random, non-zero ``lora_B`` (a fresh
  LoRA is the identity: B = 0), so the adapted model's greedy output differs from the base's. No training.

Ports: tests/test_real_servers.py takes free ports at random; the stage C tests use :data:`DEFAULT_PORT` (8093).
Two modules of one pytest run that both start a server on one port must not overlap (module-scoped fixtures
run one after the other, which is fine).
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "vllm_server.sh"
DEFAULT_PORT = 8093
MAX_LORA_RANK = 8
START_TIMEOUT_S = 1800  # a cold machine creates the vLLM venv inside `start`


def _cache() -> Path:
    return Path(os.environ.get("AUTOIF_CACHE") or Path.home() / ".cache" / "autoif").expanduser()


def _script(cmd: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), cmd], env=env, capture_output=True, text=True, timeout=timeout)


def tiny_vllm_model_dir() -> Path:
    """The tiny Qwen2 model dir the vLLM script serves by default (built once under ``$AUTOIF_CACHE/models``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("AUTOIF_VLLM_MODEL", None)
    proc = _script("model", env, 600)
    if proc.returncode != 0:
        raise RuntimeError(f"{SCRIPT} model failed (rc={proc.returncode}): {proc.stderr[-2000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


class VLLMLoRAServer:
    """A real vLLM OpenAI server with runtime LoRA loading, on ``port``, serving ``model_dir``."""

    def __init__(
        self,
        port: int = DEFAULT_PORT,
        model_dir: str | Path | None = None,
        run_dir: str | Path | None = None,
        served_name: str = "tiny-qwen2",
        max_lora_rank: int = MAX_LORA_RANK,
        extra_args: str = "",
    ) -> None:
        self.port = port
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.served_name = served_name
        self.env = {
            **os.environ,
            "AUTOIF_VLLM_PORT": str(port),
            "AUTOIF_VLLM_SERVED_NAME": served_name,
            "AUTOIF_VLLM_ARGS": f"--enable-lora --max-lora-rank {max_lora_rank} {extra_args}".strip(),
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "HF_HUB_OFFLINE": "1",
        }
        if self.model_dir is not None:
            self.env["AUTOIF_VLLM_MODEL"] = str(self.model_dir)
        else:
            self.env.pop("AUTOIF_VLLM_MODEL", None)
        if run_dir is not None:
            self.env["AUTOIF_RUN_DIR"] = str(run_dir)
        self.url: str | None = None
        self.startup_s: float | None = None

    @property
    def log_path(self) -> Path:
        run = Path(self.env.get("AUTOIF_RUN_DIR") or _cache() / "run")
        return run / f"vllm-{self.port}.log"

    def start(self) -> str:
        """Start (or reuse a healthy one this script started on the port); returns the base URL (``.../v1``)."""
        t0 = time.monotonic()
        proc = _script("start", self.env, START_TIMEOUT_S)
        self.startup_s = time.monotonic() - t0
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"{SCRIPT} start on port {self.port} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
        self.url = proc.stdout.strip().splitlines()[-1]
        return self.url

    def healthy(self) -> bool:
        return _script("status", self.env, 30).returncode == 0

    def stop(self) -> None:
        """Stop the server and its children; raises when it is still up afterwards."""
        _script("stop", self.env, 120)
        if self.healthy():
            raise RuntimeError(f"vLLM on port {self.port} still up after stop")
        self.url = None

    def __enter__(self) -> VLLMLoRAServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def perturbed_lora_adapter(
    model_dir: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    r: int = 8,
    std: float = 0.5,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
) -> Path:
    """Save a peft LoRA adapter for ``model_dir`` in ``out_dir`` with random non-zero weights (seeded)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(target_modules)))
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.normal_(0.0, std)
    out = Path(out_dir)
    peft_model.save_pretrained(str(out))
    return out
