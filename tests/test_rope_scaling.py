"""Llama 3's rope scaling (rope_type "llama3": per-pair frequency divisors between low_freq_factor and
high_freq_factor of the original context) from HF config.json and from GGUF's rope_freqs.weight,
against transformers past the original context."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import tokenmill
from gguf_util import write_tiny_gguf
from tokenmill.engine.hf import llama3_freq_factors

SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}


def _llama(rope_scaling):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=320, max_position_embeddings=512, rope_theta=500000.0,
                                   rope_scaling=rope_scaling, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_llama3_rope_scaling_matches_transformers_from_hf_and_gguf(tmp_path):
    model, plain = _llama(SCALING), _llama(None)
    model.save_pretrained(tmp_path / "hf")
    ids = np.random.default_rng(0).integers(0, 320, 300).tolist()   # well past the original 64 positions
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
        unscaled = plain(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(want - unscaled).max() > 1e-3   # the scaling matters here: 300x the tolerance below
    got = tokenmill.load(tmp_path / "hf").logits(ids)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    factors = llama3_freq_factors(SCALING, 500000.0, 16)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and 1.0 < factors[1] < 8.0   # short kept, long divided, blend
    # llama.cpp's GGUF carries the same divisors as the tensor rope_freqs.weight
    reference = write_tiny_gguf(model, "llama", tmp_path / "m.gguf", extra={"rope_freqs.weight": factors})
    with torch.no_grad():
        want_gguf = reference(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(tokenmill.load(tmp_path / "m.gguf").logits(ids), want_gguf, atol=1e-5, rtol=0)


def test_bad_rope_scaling_is_a_clear_error(tmp_path):
    import json

    _llama(None).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for scaling, error, match in (({"rope_type": "yarn", "factor": 4.0}, tokenmill.UnsupportedModelError, "'yarn'"),
                                  ({"rope_type": "llama3", "factor": 8.0}, tokenmill.ModelFormatError, "low_freq_factor")):
        cfg.pop("rope_parameters", None)
        cfg["rope_scaling"] = scaling
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(error, match=match):
            tokenmill.load(tmp_path)
