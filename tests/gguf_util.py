"""Writes tiny HF models as GGUF files with the `gguf` package (the format's reference writer), the
way llama.cpp's converter lays them out: GGUF tensor names, and for the llama architecture Q/K rows
permuted so that RoPE rotates adjacent pairs."""

from __future__ import annotations

import copy
from typing import Optional

import gguf
import numpy as np
import torch

QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
}


# q5_*, iq4_nl and the K-quants: write_tiny_gguf quantizes q5_0 / q5_1 with the gguf package, q4_k /
# q5_k / q6_k with tokenmill (the gguf package has no K-quant quantizer), and writes the rest as random
# blocks scaled to the tensor's spread
EXTRA_TYPES = {
    "q5_0": gguf.GGMLQuantizationType.Q5_0, "q5_1": gguf.GGMLQuantizationType.Q5_1,
    "q2_k": gguf.GGMLQuantizationType.Q2_K, "q3_k": gguf.GGMLQuantizationType.Q3_K,
    "q4_k": gguf.GGMLQuantizationType.Q4_K, "q5_k": gguf.GGMLQuantizationType.Q5_K,
    "q6_k": gguf.GGMLQuantizationType.Q6_K, "iq4_nl": gguf.GGMLQuantizationType.IQ4_NL,
}
# byte offsets of each block's f16 scale fields
F16_FIELDS = {"q5_0": [0], "q5_1": [0, 2], "q2_k": [80, 82], "q3_k": [108], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208],
              "iq4_nl": [0]}
# a field value giving weights of about unit spread per unit of it
UNIT_SCALE = {"q2_k": 0.5, "q3_k": 0.12, "q4_k": 0.01, "q5_k": 0.005, "q6_k": 0.03, "iq4_nl": 0.015}
# the types write_tiny_gguf writes as random blocks (no quantizer here or in the gguf package)
RANDOM_BLOCK_TYPES = ("q2_k", "q3_k", "iq4_nl")


def random_blocks(wtype: str, n_blocks: int, spread: float, rng) -> np.ndarray:
    qtype = EXTRA_TYPES[wtype]
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for i, off in enumerate(F16_FIELDS[wtype]):
        scale = spread * UNIT_SCALE[wtype] * (1.0 if i == 0 else 0.5)
        halves = (np.abs(rng.standard_normal(n_blocks)) * scale).astype(np.float16)
        raw[:, off:off + 2] = halves.view(np.uint8).reshape(n_blocks, 2)
    return raw


def permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF (rotate halves) row order -> llama.cpp (rotate adjacent pairs) row order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_from_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_tensors(sd: dict, cfg, arch: str):
    """GGUF name -> (array, needs_unpermute n_head or 0)."""
    out = {"token_embd.weight": (sd["model.embed_tokens.weight"], 0), "output_norm.weight": (sd["model.norm.weight"], 0)}
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        out["output.weight"] = (sd["lm_head.weight"], 0)
    permute = arch == "llama"
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = (sd[p + "input_layernorm.weight"], 0)
        out[b + "ffn_norm.weight"] = (sd[p + "post_attention_layernorm.weight"], 0)
        for hf, gg, heads in (("q_proj", "attn_q", cfg.num_attention_heads), ("k_proj", "attn_k", cfg.num_key_value_heads),
                              ("v_proj", "attn_v", 0), ("o_proj", "attn_output", 0)):
            n = heads if permute else 0
            out[b + gg + ".weight"] = (sd[p + f"self_attn.{hf}.weight"], n)
            if p + f"self_attn.{hf}.bias" in sd:
                out[b + gg + ".bias"] = (sd[p + f"self_attn.{hf}.bias"], n)
        for hf, gg in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            out[b + gg + ".weight"] = (sd[p + f"mlp.{hf}.weight"], 0)
    return out


def _gpt2_tensors(sd: dict, cfg):
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    out = {
        "token_embd.weight": (sd["wte.weight"], 0),
        "position_embd.weight": (sd["wpe.weight"], 0),
        "output_norm.weight": (sd["ln_f.weight"], 0),
        "output_norm.bias": (sd["ln_f.bias"], 0),
    }
    for i in range(cfg.n_layer):
        p, b = f"h.{i}.", f"blk.{i}."
        for hf, gg in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            out[b + gg + ".weight"] = (sd[p + hf + ".weight"], 0)
            out[b + gg + ".bias"] = (sd[p + hf + ".bias"], 0)
        for hf, gg in (("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"), ("mlp.c_fc", "ffn_up"),
                       ("mlp.c_proj", "ffn_down")):
            out[b + gg + ".weight"] = (sd[p + hf + ".weight"].T.copy(), 0)   # Conv1D stores [in, out]
            out[b + gg + ".bias"] = (sd[p + hf + ".bias"], 0)
    return out


def add_llama_like_keys(w: gguf.GGUFWriter, cfg) -> None:
    """The hyper-parameter keys of a RoPE decoder (llama, qwen, phi3...) from its HF config."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim and head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta)


def write_tiny_gguf(hf_model, arch: str, path, wtype: str = "f32", extra: Optional[dict] = None):
    """Writes hf_model as GGUF with 2-D weights in `wtype` (norms and biases stay f32) and returns a
    copy of hf_model whose weights are the dequantized GGUF weights: the exact reference."""
    cfg = hf_model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    tensors = _gpt2_tensors(sd, cfg) if arch == "gpt2" else _llama_tensors(sd, cfg, arch)
    w = gguf.GGUFWriter(str(path), arch)
    if arch == "gpt2":
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        add_llama_like_keys(w, cfg)
    dequantized = {}
    for name, (array, n_head) in tensors.items():
        data = permute_for_gguf(array, n_head) if n_head else array
        qtype = {**QTYPES, **EXTRA_TYPES}[wtype] if data.ndim == 2 else QTYPES["f32"]
        if wtype in ("q4_k", "q5_k", "q6_k") and data.ndim == 2:
            # tokenmill's quantizer: byte for byte llama.cpp's (test_kquants checks it)
            from tokenmill import _core

            raw = np.frombuffer(_core.quantize(wtype, np.ascontiguousarray(data, np.float32).ravel()), np.uint8)
            w.add_tensor(name, raw.reshape(data.shape[0], -1), raw_dtype=qtype)
            back = gguf.quants.dequantize(raw.reshape(data.shape[0], -1), qtype).reshape(data.shape)
        elif wtype in RANDOM_BLOCK_TYPES and data.ndim == 2:
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            raw = random_blocks(wtype, data.size // block, float(data.std()), np.random.default_rng(data.size))
            w.add_tensor(name, raw.reshape(data.shape[0], -1), raw_dtype=qtype)
            back = gguf.quants.dequantize(raw, qtype).reshape(data.shape)
        elif qtype == QTYPES["f32"]:
            w.add_tensor(name, data)
            back = data
        elif qtype == QTYPES["f16"]:
            w.add_tensor(name, data.astype(np.float16))
            back = data.astype(np.float16).astype(np.float32)
        else:
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(name, q, raw_dtype=qtype)
            back = gguf.quants.dequantize(q, qtype).reshape(data.shape)
        dequantized[name] = unpermute_from_gguf(back, n_head) if n_head else back
    for name, array in (extra or {}).items():   # written as given (f32), e.g. rope_freqs.weight
        w.add_tensor(name, np.asarray(array, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # the reference: the HF model carrying exactly the weights the GGUF file holds
    reference = copy.deepcopy(hf_model)
    new_sd = reference.state_dict()
    lookup = _gpt2_names(cfg) if arch == "gpt2" else _llama_names(cfg, arch)
    for hf_name, (gg_name, transpose) in lookup.items():
        if hf_name in new_sd and gg_name in dequantized:
            value = dequantized[gg_name].T if transpose else dequantized[gg_name]
            new_sd[hf_name] = torch.from_numpy(np.ascontiguousarray(value))
    if getattr(cfg, "tie_word_embeddings", False) or arch == "gpt2":
        head = "lm_head.weight"
        new_sd[head] = new_sd["transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"]
    reference.load_state_dict(new_sd)
    return reference


def _llama_names(cfg, arch):
    names = {"model.embed_tokens.weight": ("token_embd.weight", False), "model.norm.weight": ("output_norm.weight", False),
             "lm_head.weight": ("output.weight", False)}
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        names[p + "input_layernorm.weight"] = (b + "attn_norm.weight", False)
        names[p + "post_attention_layernorm.weight"] = (b + "ffn_norm.weight", False)
        for hf, gg in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")):
            names[p + f"self_attn.{hf}.weight"] = (b + gg + ".weight", False)
            names[p + f"self_attn.{hf}.bias"] = (b + gg + ".bias", False)
        for hf, gg in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            names[p + f"mlp.{hf}.weight"] = (b + gg + ".weight", False)
    return names


def _gpt2_names(cfg):
    names = {"transformer.wte.weight": ("token_embd.weight", False), "transformer.wpe.weight": ("position_embd.weight", False),
             "transformer.ln_f.weight": ("output_norm.weight", False), "transformer.ln_f.bias": ("output_norm.bias", False)}
    for i in range(cfg.n_layer):
        p, b = f"transformer.h.{i}.", f"blk.{i}."
        for hf, gg in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            names[p + hf + ".weight"] = (b + gg + ".weight", False)
            names[p + hf + ".bias"] = (b + gg + ".bias", False)
        for hf, gg in (("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"), ("mlp.c_fc", "ffn_up"),
                       ("mlp.c_proj", "ffn_down")):
            names[p + hf + ".weight"] = (b + gg + ".weight", True)
            names[p + hf + ".bias"] = (b + gg + ".bias", False)
    return names
