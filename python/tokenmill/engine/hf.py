"""Hugging Face model directories: config.json -> native hyper-parameters, and the safetensors
files that hold the weights (single file or sharded with model.safetensors.index.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from ..errors import ModelFormatError, UnsupportedModelError
from ..jsonfile import read_json_object
from . import native

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "gpt2", "bert")


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise ModelFormatError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    return read_json_object(path)


def _get(config: dict, key: str, kind=int, default=None):
    value = config.get(key, default)
    if value is None:
        raise ModelFormatError(f"config.json lacks '{key}'")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ModelFormatError(f"config.json '{key}' must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise ModelFormatError(f"config.json '{key}' must be a finite number, got {value!r}")
    return kind(value)


def _rope_settings(config: dict) -> tuple[dict, Optional[dict]]:
    """(rope parameters, the llama3 scaling block or None). transformers 5 moved rope settings into
    `rope_parameters`; older configs have rope_theta / rope_scaling."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    llama3 = None
    for block in (params, scaling):
        if not isinstance(block, dict):
            raise ModelFormatError(f"config.json rope settings must be an object, got {block!r}")
        rope_type = block.get("rope_type", block.get("type", "default"))
        if rope_type == "llama3":
            llama3 = block
        elif rope_type not in (None, "default"):
            raise UnsupportedModelError(f"RoPE scaling '{rope_type}' is not supported (default and llama3 are)")
    return params, llama3


def llama3_freq_factors(block: dict, theta: float, head_dim: int) -> list[float]:
    """Per rotary pair, what Llama 3's rope scaling divides the frequency by: 1 for short wavelengths
    (under original_max_position_embeddings / high_freq_factor), `factor` for long ones (over the same
    / low_freq_factor), a smooth blend between -- in float32, as transformers computes them."""
    import numpy as np

    try:
        factor = float(block["factor"])
        low, high = float(block["low_freq_factor"]), float(block["high_freq_factor"])
        old_ctx = float(block["original_max_position_embeddings"])
    except (KeyError, TypeError, ValueError):
        raise ModelFormatError("llama3 rope scaling needs numeric factor, low_freq_factor, high_freq_factor and "
                               "original_max_position_embeddings") from None
    if not (factor > 0 and high > low > 0 and old_ctx > 0):
        raise ModelFormatError(f"llama3 rope scaling values out of range: {block}")
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))).astype(np.float32)
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > old_ctx / low, inv / np.float32(factor), inv).astype(np.float32)
    smooth = ((old_ctx / wavelen - low) / (high - low)).astype(np.float32)
    blended = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    scaled = np.where(medium, blended, scaled).astype(np.float32)
    return (inv / scaled).astype(np.float32).tolist()


def _rope_theta(config: dict) -> float:
    params, _ = _rope_settings(config)
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
        raise ModelFormatError(f"config.json rope_theta must be a positive finite number, got {theta!r}")
    return float(theta)


def _gemma3_rope(config: dict) -> tuple[float, float]:
    """(global RoPE base, local RoPE base): transformers 5 keeps one rope block per layer type."""
    params = config.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        blocks = {kind: params.get(kind) or {} for kind in ("full_attention", "sliding_attention")}
    else:
        if config.get("rope_scaling"):
            blocks = {"full_attention": config["rope_scaling"]}
        else:
            blocks = {}
        blocks = {"full_attention": {**blocks.get("full_attention", {}), "rope_theta": config.get("rope_theta", 1e6)},
                  "sliding_attention": {"rope_theta": config.get("rope_local_base_freq", 10000.0)}}
    for kind, block in blocks.items():
        rope_type = block.get("rope_type", block.get("type", "default"))
        if rope_type not in (None, "default"):
            raise UnsupportedModelError(f"Gemma 3 RoPE scaling '{rope_type}' ({kind} layers) is not supported (default is)")
    thetas = []
    for kind, default in (("full_attention", 1e6), ("sliding_attention", 1e4)):
        theta = blocks[kind].get("rope_theta", default)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
            raise ModelFormatError(f"config.json {kind} rope_theta must be a positive number, got {theta!r}")
        thetas.append(float(theta))
    return thetas[0], thetas[1]


def _gemma3_hparams(config: dict, hp):
    """Gemma 3 (text): sandwich norms with (1 + w) weights, GeGLU, qk-norm, sqrt(hidden)-scaled
    embeddings, local sliding-window layers (their own RoPE base) between global ones."""
    hp.arch = "gemma3"
    act = config.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise UnsupportedModelError(f"Gemma 3 activation '{act}' is not supported (gelu_pytorch_tanh is)")
    for key in ("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention", "attention_bias"):
        if config.get(key):
            raise UnsupportedModelError(f"Gemma 3 with {key}={config[key]!r} is not supported")
    hp.n_vocab = _get(config, "vocab_size")
    hp.n_embd = _get(config, "hidden_size")
    hp.n_layer = _get(config, "num_hidden_layers")
    hp.n_head = _get(config, "num_attention_heads")
    hp.n_head_kv = _get(config, "num_key_value_heads", int, hp.n_head)
    hp.head_dim = _get(config, "head_dim", int, hp.n_embd // hp.n_head if hp.n_head > 0 else 0)
    hp.n_ff = _get(config, "intermediate_size")
    hp.n_ctx_train = _get(config, "max_position_embeddings")
    hp.norm_eps = _get(config, "rms_norm_eps", float, 1e-6)
    hp.rope_theta, hp.rope_theta_local = _gemma3_rope(config)
    hp.rope_style = native.RopeStyle.halves
    hp.tied_embeddings = bool(config.get("tie_word_embeddings", True))
    hp.sliding_window = _get(config, "sliding_window", int, 4096)
    kinds = config.get("layer_types")
    if kinds is None:
        pattern = _get(config, "sliding_window_pattern", int, 6)
        kinds = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(hp.n_layer)]
    if not isinstance(kinds, list) or len(kinds) != hp.n_layer or any(k not in ("sliding_attention", "full_attention")
                                                                         for k in kinds):
        raise ModelFormatError(f"config.json layer_types must list sliding_attention / full_attention per layer, got {kinds!r}")
    hp.local_layers = [k == "sliding_attention" for k in kinds]
    hp.attn_scale = _get(config, "query_pre_attn_scalar", float, hp.head_dim) ** -0.5
    hp.norm_offset = 1.0   # Gemma's RMSNorm multiplies by (1 + w); the GGUF converter stores w + 1 instead
    return hp


def hparams_from_config(config: dict):
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"model architecture '{model_type}' is not supported (supported: {', '.join(SUPPORTED)})"
        )
    hp = native.hparams()
    hp.arch = model_type
    if model_type == "gemma3_text":
        return _gemma3_hparams(config, hp)
    if model_type == "gpt2":
        act = config.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UnsupportedModelError(f"GPT-2 activation '{act}' is not supported (gelu_new is)")
        hp.n_vocab = _get(config, "vocab_size")
        hp.n_embd = _get(config, "n_embd")
        hp.n_layer = _get(config, "n_layer")
        hp.n_head = hp.n_head_kv = _get(config, "n_head")
        hp.head_dim = hp.n_embd // hp.n_head if hp.n_head > 0 else 0
        hp.n_ff = _get(config, "n_inner") if config.get("n_inner") is not None else 4 * hp.n_embd
        hp.n_ctx_train = _get(config, "n_positions")
        hp.norm_eps = _get(config, "layer_norm_epsilon", float, 1e-5)
        hp.rope_style = native.RopeStyle.none
        hp.tied_embeddings = True
        return hp
    if model_type == "bert":
        act = config.get("hidden_act", "gelu")
        if act != "gelu":
            raise UnsupportedModelError(f"BERT activation '{act}' is not supported (gelu is)")
        positions = config.get("position_embedding_type", "absolute")
        if positions != "absolute":
            raise UnsupportedModelError(f"BERT position embeddings '{positions}' are not supported (absolute are)")
        hp.n_vocab = _get(config, "vocab_size")
        hp.n_embd = _get(config, "hidden_size")
        hp.n_layer = _get(config, "num_hidden_layers")
        hp.n_head = hp.n_head_kv = _get(config, "num_attention_heads")
        hp.head_dim = hp.n_embd // hp.n_head if hp.n_head > 0 else 0
        hp.n_ff = _get(config, "intermediate_size")
        hp.n_ctx_train = _get(config, "max_position_embeddings")
        hp.norm_eps = _get(config, "layer_norm_eps", float, 1e-12)
        hp.rope_style = native.RopeStyle.none
        return hp

    hp.n_vocab = _get(config, "vocab_size")
    hp.n_embd = _get(config, "hidden_size")
    hp.n_layer = _get(config, "num_hidden_layers")
    hp.n_head = _get(config, "num_attention_heads")
    hp.n_head_kv = _get(config, "num_key_value_heads", int, hp.n_head)
    head_dim = _get(config, "head_dim") if config.get("head_dim") is not None else 0
    hp.head_dim = head_dim or (hp.n_embd // hp.n_head if hp.n_head > 0 else 0)
    hp.n_ff = _get(config, "intermediate_size")
    hp.n_ctx_train = _get(config, "max_position_embeddings")
    hp.norm_eps = _get(config, "rms_norm_eps", float, 1e-6)
    hp.rope_theta = _rope_theta(config)
    _, llama3 = _rope_settings(config)
    if llama3 is not None:
        hp.rope_freq_factors = llama3_freq_factors(llama3, hp.rope_theta, hp.head_dim)
    hp.rope_style = native.RopeStyle.halves
    hp.tied_embeddings = bool(config.get("tie_word_embeddings", False))
    if config.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"activation '{config.get('hidden_act')}' is not supported (silu is)")
    if model_type in ("mistral", "phi3"):
        hp.sliding_window = _get(config, "sliding_window") if config.get("sliding_window") is not None else 0
    if model_type == "phi3":
        params, _ = _rope_settings(config)
        partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise UnsupportedModelError(f"partial rotary embeddings (partial_rotary_factor {partial}) are not supported")
    if model_type == "qwen3" and config.get("attention_bias"):
        raise UnsupportedModelError("Qwen3 with attention_bias is not supported")
    if model_type in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        raise UnsupportedModelError("Qwen2 per-layer sliding-window attention is not supported")
    return hp


def safetensors_files(directory: Path) -> list[str]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFormatError(f"cannot read {index}: {exc}") from exc
        names = sorted(set(weight_map.values()))
        for name in names:
            if Path(name).name != name or not (directory / name).exists():
                raise ModelFormatError(f"{index} names a missing or invalid shard '{name}'")
        return [str(directory / n) for n in names]
    single = directory / "model.safetensors"
    if single.exists():
        return [str(single)]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        if list(directory.glob("*.bin")) or list(directory.glob("*.pt")):
            raise UnsupportedModelError(
                f"{directory} holds only pickle (.bin/.pt) weights, which tokenmill never loads; convert them to safetensors"
            )
        raise ModelFormatError(f"{directory} has no .safetensors weights")
    return [str(f) for f in files]
