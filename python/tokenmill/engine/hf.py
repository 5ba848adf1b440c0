"""Hugging Face model directories: config.json -> native hyper-parameters, and the safetensors
files that hold the weights (single file or sharded with model.safetensors.index.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import ModelFormatError, UnsupportedModelError
from ..jsonfile import read_json_object
from . import native

SUPPORTED = ("llama", "mistral", "qwen2", "gpt2", "bert")


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


def _rope_theta(config: dict) -> float:
    # transformers 5 moved rope settings into `rope_parameters`; older configs have rope_theta / rope_scaling
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for block in (params, scaling):
        if not isinstance(block, dict):
            raise ModelFormatError(f"config.json rope settings must be an object, got {block!r}")
        rope_type = block.get("rope_type", block.get("type", "default"))
        if rope_type not in (None, "default"):
            raise UnsupportedModelError(f"RoPE scaling '{rope_type}' is not supported")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
        raise ModelFormatError(f"config.json rope_theta must be a positive finite number, got {theta!r}")
    return float(theta)


def hparams_from_config(config: dict):
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"model architecture '{model_type}' is not supported (supported: {', '.join(SUPPORTED)})"
        )
    hp = native.hparams()
    hp.arch = model_type
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
    hp.rope_style = native.RopeStyle.halves
    hp.tied_embeddings = bool(config.get("tie_word_embeddings", False))
    if config.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"activation '{config.get('hidden_act')}' is not supported (silu is)")
    if model_type == "mistral":
        hp.sliding_window = _get(config, "sliding_window") if config.get("sliding_window") is not None else 0
    if model_type == "qwen2" and config.get("use_sliding_window"):
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
