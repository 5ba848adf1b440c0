"""Shared fixtures: tiny random HF models (saved as safetensors directories) and the real default
model. Everything heavy is session-scoped so each model is built or loaded once per run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import torch  # test extras: the peer every value is checked against, never optional
import transformers

TINY = dict(vocab_size=320, max_position_embeddings=256)


def _llama_like(cls_config, **extra):
    return cls_config(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        initializer_range=0.08,
        tie_word_embeddings=False,
        **TINY,
        **extra,
    )


def tiny_config(arch: str):
    if arch == "llama":
        return _llama_like(transformers.LlamaConfig, rope_theta=10000.0)
    if arch == "qwen2":
        # Qwen2 always has Q/K/V biases; tied embeddings as in the small Qwen2.5 models
        cfg = _llama_like(transformers.Qwen2Config, rope_theta=1000000.0)
        cfg.tie_word_embeddings = True
        return cfg
    if arch == "mistral":
        # a sliding window shorter than the test prompt, so the window is really exercised
        return _llama_like(transformers.MistralConfig, rope_theta=10000.0, sliding_window=24)
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=320, n_positions=256, n_embd=64, n_layer=3, n_head=4, initializer_range=0.08
        )
    raise ValueError(arch)


def build_tiny(arch: str, directory: Path, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        # random (not zero) biases and norm weights, so every parameter matters in the comparison
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> (directory, HF model)."""
    out = {}
    for arch in ("llama", "qwen2", "mistral", "gpt2"):
        d = tmp_path_factory.mktemp(f"tiny-{arch}")
        out[arch] = (d, build_tiny(arch, d))
    return out


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The real SmolLM2 GGUF, fetched through tokenmill's own default-model path."""
    from tokenmill.engine.default_model import resolve_default

    return resolve_default()


@pytest.fixture(scope="session")
def smollm(default_gguf):
    import tokenmill

    return tokenmill.load(default_gguf)


@pytest.fixture(scope="session")
def hf_smollm(default_gguf):
    """transformers' own loading of the same GGUF (dequantized to float32): the peer reference."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    return model, tok


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to max |b|."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def pytest_report_header(config):
    return f"TOKENMILL_HOME={os.environ.get('TOKENMILL_HOME', '~/.cache/tokenmill')}"
