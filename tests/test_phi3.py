"""Phi-3: fused QKV and fused gate/up projections (split at load), rotate-halves RoPE, its sliding
window — from an HF directory and from a GGUF laid out as llama.cpp writes phi3, against transformers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers

import tokenmill
from gguf_util import add_llama_like_keys


def _phi3(sliding_window=None):
    torch.manual_seed(7)
    cfg = transformers.Phi3Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, pad_token_id=0,
                                  eos_token_id=1, bos_token_id=2, sliding_window=sliding_window, tie_word_embeddings=False)
    return transformers.Phi3ForCausalLM(cfg).eval()


def _write_gguf(model, path):
    cfg, sd = model.config, {k: v.numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "phi3")
    add_llama_like_keys(w, cfg)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for hf, gg in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                       ("self_attn.qkv_proj", "attn_qkv"), ("self_attn.o_proj", "attn_output"),
                       ("mlp.gate_up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")):
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("window", [None, 16])
def test_phi3_matches_transformers_from_hf_and_gguf(tmp_path, window):
    model = _phi3(window)
    model.save_pretrained(tmp_path / "hf")
    ids = np.random.default_rng(2).integers(3, 320, 48).tolist()   # longer than the window
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    m = tokenmill.load(tmp_path / "hf")
    assert m.hparams.sliding_window == (window or 0)
    np.testing.assert_allclose(m.logits(ids), want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(m.logits(ids, chunk=5), want, atol=1e-4, rtol=0)
    if window is None:
        _write_gguf(model, tmp_path / "phi3.gguf")
        g = tokenmill.load(tmp_path / "phi3.gguf")
        assert g.hparams.arch == "phi3"
        np.testing.assert_allclose(g.logits(ids), want, atol=1e-4, rtol=0)


def test_phi3_partial_rotary_is_refused(tmp_path):
    import json

    _phi3().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["partial_rotary_factor"] = 0.5
    cfg.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(tokenmill.UnsupportedModelError, match="partial rotary"):
        tokenmill.load(tmp_path)
