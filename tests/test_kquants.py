"""The GGUF types beyond the legacy 4/8-bit ones: q5_0, q5_1 and the K-quants. Exact dequantization
against the gguf package's; quantizers byte for byte llama.cpp's (and the gguf package's for q5_*);
models holding any of them computed natively with
the logits of transformers on the gguf package's dequantization of the same file (what transformers
itself does when it reads a GGUF); rows computed as decode equal one-token steps bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import gguf
import tokenmill
from tokenmill import _core
from gguf_util import EXTRA_TYPES, random_blocks, write_tiny_gguf
import quant_reference

QUANTIZABLE = ("q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
NATIVE = QUANTIZABLE + ("q2_k", "q3_k", "iq4_nl")   # these three are computed with, not quantized to


@pytest.mark.parametrize("wtype", list(EXTRA_TYPES))
def test_dequantization_is_bit_exact(wtype):
    qtype = EXTRA_TYPES[wtype]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(1)
    raw = random_blocks(wtype, 64, 1.0, rng) if wtype in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl") else \
        gguf.quants.quantize(rng.standard_normal(64 * block).astype(np.float32).reshape(8, -1), qtype)
    n = raw.size // gguf.GGML_QUANT_SIZES[qtype][1] * block
    np.testing.assert_array_equal(_core.dequantize(wtype, raw.tobytes(), n), gguf.quants.dequantize(raw, qtype).reshape(-1))


@pytest.mark.parametrize("inputs", ["random", "edge", "smollm2_ffn_down_0"])
def test_quantizers_are_llama_cpp_s_byte_for_byte(inputs, request):
    """SHA-256 of llama.cpp's own output (ggml_quantize_chunk of llama-cpp-python 0.3.36, recorded by
    tests/quant_reference.py) for the same rows: ordinary, edge-case and real weights."""
    record = json.loads(quant_reference.RECORD.read_text())["sha256"][inputs]
    x = {"random": quant_reference.random_rows, "edge": quant_reference.edge_rows}.get(inputs)
    x = x() if x else quant_reference.smollm_rows(request.getfixturevalue("default_gguf"))
    for wtype in QUANTIZABLE:
        assert quant_reference.digest(_core.quantize(wtype, x.ravel())) == record[wtype], wtype


@pytest.mark.parametrize("wtype", ["q5_0", "q5_1"])
def test_5bit_quantizers_are_the_gguf_package_s(wtype):
    x = quant_reference.edge_rows()[:, :256]
    want = gguf.quants.quantize(x, EXTRA_TYPES[wtype]).tobytes()
    assert _core.quantize(wtype, x.ravel()) == want


def test_quantization_error_shrinks_with_the_bits():
    """Relative RMS error on normal weights, as the formats promise: q4_k < q4_0-class q5_0 < ... and
    every K-quant below its legacy fallback of the same size (q4_k vs q4_1, q5_k vs q5_1)."""
    x = quant_reference.random_rows().ravel()

    def err(t):
        back = _core.dequantize(t, _core.quantize(t, x), x.size)
        return float(np.sqrt(np.mean((back - x) ** 2) / np.mean(x ** 2)))

    e = {t: err(t) for t in ("q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0")}
    assert e["q4_k"] < e["q4_1"] < e["q4_0"]
    assert e["q5_k"] < e["q5_1"] < e["q5_0"] < e["q4_k"]
    assert e["q8_0"] < e["q6_k"] < e["q5_k"]


@pytest.fixture(scope="module")
def k_model():
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=320, max_position_embeddings=128,
                                   tie_word_embeddings=False, rms_norm_eps=1e-5)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def k_files(k_model, tmp_path_factory):
    """wtype -> (GGUF path, transformers model on its dequantized weights)."""
    d = tmp_path_factory.mktemp("kq")
    return {t: (d / f"tiny-{t}.gguf", write_tiny_gguf(k_model, "llama", d / f"tiny-{t}.gguf", t))
            for t in list(EXTRA_TYPES) + ["f16"]}


IDS = [3, 77, 150, 9, 281, 40, 12, 199]


@pytest.mark.parametrize("wtype", list(EXTRA_TYPES))
def test_models_match_transformers(k_files, wtype):
    path, reference = k_files[wtype]
    with torch.no_grad():
        want = reference(torch.tensor([IDS])).logits[0].numpy()
    model = tokenmill.load(path)   # computed on the file's blocks: float-exact
    got = model.logits(IDS)
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)
    np.testing.assert_allclose(model.logits(IDS, chunk=1), want, atol=2e-4 * np.abs(want).max(), rtol=0)
    assert model.weight_bytes < tokenmill.load(k_files["f16"][0]).weight_bytes / 2
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("wtype", ["q4_k", "q6_k"])
def test_greedy_tokens_equal_transformers(k_files, wtype):
    path, reference = k_files[wtype]
    greedy = tokenmill.GenerateConfig(max_new_tokens=32, temperature=0, ignore_eos=True)
    out = tokenmill.Generator(tokenmill.load(path), greedy).generate(IDS)
    with torch.no_grad():
        want = reference.generate(torch.tensor([IDS]), attention_mask=torch.ones(1, len(IDS), dtype=torch.long),
                                  max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out == want[0, len(IDS):].tolist()


@pytest.mark.parametrize("wtype", NATIVE)
def test_rows_as_decode_are_one_token_steps_at_every_level(k_files, wtype):
    """What speculative verification and the scheduler's batched decode rows rely on."""
    model = tokenmill.load(k_files[wtype][0])
    ids = np.random.default_rng(2).integers(0, 320, size=40).tolist()
    before = _core.cpu_level()
    try:
        for level in _core.cpu_levels():
            _core.set_cpu_level(level)
            one, batch = model.new_cache(64), model.new_cache(64)
            model.eval(one, ids[:24], logits=None)
            model.eval(batch, ids[:24], logits=None)
            steps = np.stack([model.eval(one, [t], hidden="last").logits[0] for t in ids[24:]])
            verify = model.eval(batch, ids[24:], logits="all", decode_exact=True).logits
            np.testing.assert_array_equal(verify, steps, err_msg=level)
    finally:
        _core.set_cpu_level(before)


@pytest.mark.skipif("avx512" not in _core.cpu_levels(), reason="the int8 decode kernels need AVX-512 VNNI")
@pytest.mark.parametrize("wtype", ["q4_k", "q5_0", "q5_1"])
def test_int8_decode_of_the_eight_row_types(k_files, wtype):
    """load(int8_decode=True) on the types that join q4_* in eight-row groups: one-token steps take x
    rounded to int8, near the exact steps with the same top tokens, and a verification pass's rows are
    those steps bit for bit."""
    path = k_files[wtype][0]
    ids = np.random.default_rng(4).integers(0, 320, size=40).tolist()
    before = _core.cpu_level()
    _core.set_cpu_level("avx512")
    try:
        steps = {}
        for int8 in (False, True):
            model = tokenmill.load(path, int8_decode=int8)
            cache = model.new_cache(64)
            model.eval(cache, ids[:24], logits=None)
            steps[int8] = np.stack([model.eval(cache, [t]).logits[0] for t in ids[24:]])
            cache = model.new_cache(64)
            model.eval(cache, ids[:24], logits=None)
            np.testing.assert_array_equal(model.eval(cache, ids[24:], logits="all", decode_exact=True).logits, steps[int8])
        err = np.abs(steps[True] - steps[False]).max() / np.abs(steps[False]).max()
        assert 1e-6 < err < 4e-2
        assert (steps[True].argmax(-1) == steps[False].argmax(-1)).mean() >= 0.9
    finally:
        _core.set_cpu_level(before)


def test_converted_on_load_equals_convert_and_falls_back_like_llama_quantize(default_gguf, tmp_path):
    """A K-quant target on SmolLM2: its 576-wide matrices are no whole super-blocks, so they take q5_0
    for q4_k and q8_0 for q6_k (llama-quantize's fallbacks), the 1536-wide FFN down projections the
    K-quant -- and on load exactly the numbers `tokenmill convert` writes."""
    from tokenmill.tools.convert import convert_gguf

    for wtype, fallback in (("q4_k", "q5_0"), ("q6_k", "q8_0")):
        out = convert_gguf(default_gguf, tmp_path / f"smol.{wtype}.gguf", wtype)
        types = {name: t for name, t, s, _, _ in _core.GGUFFile(str(out)).tensors() if len(s) == 2}
        assert types["blk.0.ffn_down.weight"] == wtype and types["blk.0.attn_q.weight"] == fallback
        assert set(types.values()) == {wtype, fallback}
    on_disk, on_load = tokenmill.load(out), tokenmill.load(default_gguf, weights="q6_k")
    ids = on_disk.tokenize("The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is")
    got = on_load.logits(ids)
    np.testing.assert_array_equal(got, on_disk.logits(ids))
    # close to the original: same top token nearly everywhere (requantizing the 4-bit original costs a
    # little: mean KL 0.01 here -- enough to flip the first token of a chat answer whose margin is 0.14)
    want = tokenmill.load(default_gguf).logits(ids)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    assert np.abs(got - want).max() < 0.2 * np.abs(want).max()


@pytest.mark.parametrize("level", [lv for lv in _core.cpu_levels() if lv != "scalar"])
@pytest.mark.parametrize("wtype", [t for t in NATIVE if t != "q2_k"])   # q2_k's prefill stays exact
def test_int8_prefill_of_the_models(k_files, wtype, level):
    """load(int8_prefill=True) runs q5_*, iq4_nl and K-quant prompts against x rounded to int8 (llama.cpp's
    activation precision) at the SIMD levels: logits near the exact ones with the same top tokens;
    decode steps stay exact."""
    path = k_files[wtype][0]
    ids = np.random.default_rng(3).integers(0, 320, size=40).tolist()
    before = _core.cpu_level()
    _core.set_cpu_level(level)
    try:
        exact, fast = tokenmill.load(path), tokenmill.load(path, int8_prefill=True)
        want, got = exact.logits(ids), fast.logits(ids)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert 1e-6 < err < 4e-2
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
        np.testing.assert_array_equal(fast.logits(ids[:12], chunk=1), exact.logits(ids[:12], chunk=1))
    finally:
        _core.set_cpu_level(before)
