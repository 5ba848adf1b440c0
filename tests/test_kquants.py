"""GGUF types read but not yet computed with natively (q5_0, q5_1, the K-quants q2_k..q6_k): exact
dequantization against the gguf package's, and whole models holding them loaded (converted at load)
with the logits of transformers on the gguf package's dequantization of the same file (what
transformers itself does when it reads a GGUF)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import gguf
import tokenmill
from tokenmill import _core
from gguf_util import READ_ONLY_TYPES, random_blocks, write_tiny_gguf


@pytest.mark.parametrize("wtype", list(READ_ONLY_TYPES))
def test_dequantization_is_bit_exact(wtype):
    qtype = READ_ONLY_TYPES[wtype]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(1)
    raw = random_blocks(wtype, 64, 1.0, rng) if wtype in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k") else \
        gguf.quants.quantize(rng.standard_normal(64 * block).astype(np.float32).reshape(8, -1), qtype)
    n = raw.size // gguf.GGML_QUANT_SIZES[qtype][1] * block
    np.testing.assert_array_equal(_core.dequantize(wtype, raw.tobytes(), n), gguf.quants.dequantize(raw, qtype).reshape(-1))


@pytest.fixture(scope="module")
def k_model():
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=320, max_position_embeddings=128,
                                   tie_word_embeddings=False, rms_norm_eps=1e-5)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("wtype", ["q4_k", "q6_k", "q5_k", "q3_k", "q2_k", "q5_0"])
def test_models_in_read_only_types_match_transformers(k_model, tmp_path, wtype):
    path = tmp_path / f"tiny-{wtype}.gguf"
    reference = write_tiny_gguf(k_model, "llama", path, wtype)
    ids = [3, 77, 150, 9, 281, 40, 12, 199]
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0].numpy()
    exact = tokenmill.load(path, weights="f32").logits(ids)
    np.testing.assert_allclose(exact, want, atol=2e-4 * np.abs(want).max(), rtol=0)
    got = tokenmill.load(path).logits(ids)   # converted to f16 at load
    assert np.abs(got - want).max() < 5e-3 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()
