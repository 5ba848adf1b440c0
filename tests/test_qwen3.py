"""Qwen3: per-head RMSNorm of queries and keys before RoPE (qk-norm), no QKV bias — from an HF
directory and from GGUF, against transformers; with batches and a KV cache like every family."""

from __future__ import annotations

import numpy as np
import torch
import transformers

import tokenmill
from gguf_util import write_tiny_gguf


def _qwen3():
    torch.manual_seed(5)
    cfg = transformers.Qwen3Config(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32, vocab_size=320, max_position_embeddings=256,
                                   rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():   # random norm weights, so the qk-norm really scales
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def test_qwen3_matches_transformers_from_hf_and_gguf(tmp_path):
    model = _qwen3()
    model.save_pretrained(tmp_path / "hf")
    ids = np.random.default_rng(1).integers(0, 320, 40).tolist()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    m = tokenmill.load(tmp_path / "hf")
    np.testing.assert_allclose(m.logits(ids), want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(m.logits(ids, chunk=7), want, atol=1e-4, rtol=0)   # through the KV cache in pieces
    # GGUF, as llama.cpp writes qwen3: attn_q_norm / attn_k_norm per layer, Q/K rows in HF order
    sd = model.state_dict()
    norms = {f"blk.{i}.attn_{w}_norm.weight": sd[f"model.layers.{i}.self_attn.{w}_norm.weight"].numpy()
             for i in range(3) for w in ("q", "k")}
    reference = write_tiny_gguf(model, "qwen3", tmp_path / "q3.gguf", extra=norms)
    with torch.no_grad():
        want_gguf = reference(torch.tensor([ids])).logits[0].numpy()
    g = tokenmill.load(tmp_path / "q3.gguf")
    assert g.hparams.arch == "qwen3" and g.hparams.head_dim == 32
    np.testing.assert_allclose(g.logits(ids), want_gguf, atol=1e-4, rtol=0)
    # a batch of two sequences gives each its own logits
    caches = [m.new_cache(64), m.new_cache(64)]
    both = m.eval_batch(caches, [ids[:20], ids], logits="all").logits
    np.testing.assert_allclose(both[20:], want, atol=1e-4, rtol=0)
