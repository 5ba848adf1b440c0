"""Every CPU kernel level (scalar, AVX2, ...) against the scalar reference and against exact
float64 arithmetic, and whole models run at every level."""

import os

import numpy as np
import pytest
import torch
import transformers

import tokenmill
from tokenmill import _core, _testing
from conftest import TINY, rel_err
from gguf_util import QTYPES, write_tiny_gguf

LEVELS = _core.cpu_levels()


@pytest.fixture
def level(request):
    before = _core.cpu_level()
    _core.set_cpu_level(request.param)
    yield request.param
    _core.set_cpu_level(before)


# (type, row length): the 32-block types at several lengths, the K-quants at whole super-blocks
DOT_CASES = [(t, n) for t in ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "nf4", "q5_0", "q5_1") for n in (32, 96, 576, 1536)]
DOT_CASES += [(t, n) for t in ("q4_k", "q5_k", "q6_k") for n in (256, 1536, 4864)]


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("wtype,n", DOT_CASES)
@pytest.mark.parametrize("prepared", [True, False], ids=["decode-path", "float-path"])
def test_dot_row_matches_float64(level, wtype, n, prepared):
    rng = np.random.default_rng(n)
    w = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal(n).astype(np.float32)
    row = _core.quantize(wtype, w)
    wd = _core.dequantize(wtype, row, n).astype(np.float64)
    exact = float(np.dot(wd, x.astype(np.float64)))
    got = _testing.dot_row(wtype, row, x, prepared=prepared)
    assert abs(got - exact) <= 1e-5 * (np.abs(wd) @ np.abs(x)) + 1e-6


@pytest.mark.parametrize("level", [lv for lv in LEVELS if lv != "scalar"], indirect=True)
@pytest.mark.parametrize("wtype", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"])
def test_small_batch_dot_matches_float64(level, wtype):
    rng = np.random.default_rng(7)
    n = 768
    w = rng.standard_normal(n).astype(np.float32)
    xs = (rng.standard_normal((4, n)) * np.array([[1.0], [1e-3], [50.0], [0.0]])).astype(np.float32)
    row = _core.quantize(wtype, w)
    wd = _core.dequantize(wtype, row, n).astype(np.float64)
    exact = xs.astype(np.float64) @ wd
    got = _testing.dot_row_x4(wtype, row, xs)
    assert np.all(np.abs(got - exact) <= 1e-5 * (np.abs(xs) @ np.abs(wd)) + 1e-6)
    assert got[3] == 0.0   # a zero vector has scale 0 and must not divide by it


@pytest.mark.parametrize("level", [lv for lv in LEVELS if lv != "scalar"], indirect=True)
@pytest.mark.parametrize("wtype,n", [(t, n) for t in ("q4_0", "q4_1", "q5_0", "q5_1") for n in (32, 896, 4864)] +
                         [("q4_k", 256), ("q4_k", 4864)])
@pytest.mark.parametrize("x_scale", [1.0, 1e-4, 300.0])
def test_eight_row_4bit_decode_matches_float64(level, wtype, n, x_scale):
    """The eight-row layout's kernels (AVX-512: VPDPBUSD; AVX2: VPMADDUBSW + VPMADDWD), q5_* with their
    fifth bits; rows of their own magnitude and offset, so q4_k's d, dmin and sub-block scales and mins
    all differ."""
    rng = np.random.default_rng(n)
    w = (rng.standard_normal((8, n)) * rng.uniform(0.01, 3, (8, 1)) + rng.uniform(-1, 1, (8, 1))).astype(np.float32)
    x = (rng.standard_normal(n) * x_scale).astype(np.float32)
    x[:32] = 0.0   # an all-zero block has scale 0
    rows = b"".join(_core.quantize(wtype, r) for r in w)
    wd = np.stack([_core.dequantize(wtype, _core.quantize(wtype, r), n) for r in w]).astype(np.float64)
    got, unpacked, floats = _testing.dot_rows_packed8(wtype, rows, x)
    assert unpacked == rows
    assert np.array_equal(floats, wd.astype(np.float32))   # prefill's dequantization from the layout
    exact = wd @ x.astype(np.float64)
    # four int8 parts carry x to d / 2^22: as close as float accumulation
    assert np.all(np.abs(got - exact) <= 1e-6 * (np.abs(wd) @ np.abs(x)) + 1e-30)


@pytest.mark.parametrize("level", [lv for lv in LEVELS if lv != "scalar"], indirect=True)
@pytest.mark.parametrize("n_rows,n", [(16, 32), (16, 576), (5, 1536)])
@pytest.mark.parametrize("x_scale", [1.0, 1e-4, 300.0])
def test_q8_0_strip_decode_matches_float64(level, n_rows, n, x_scale):
    """Exact decode of Q8_0 in strips of sixteen rows (AVX-512: w + 128 against x's four int8 parts,
    VPDPBUSD), a short strip's missing rows as zeros; each token's values whatever the tokens beside
    it (1 to 4 per call), and a zero block (scale 0) harmless."""
    rng = np.random.default_rng(n + n_rows)
    w = (rng.standard_normal((n_rows, n)) * rng.uniform(0.01, 3, (n_rows, 1))).astype(np.float32)
    w[0, :32] = 0.0
    w[1] = np.where(np.arange(n) % 2, 127.0, -127.0)   # the extreme levels, so u = 1 and 255 both occur
    xs = (rng.standard_normal((4, n)) * x_scale).astype(np.float32)
    xs[1, :32] = 0.0
    xs[2] = np.abs(xs[2])   # all parts of one sign: the largest part sums
    rows = b"".join(_core.quantize("q8_0", r) for r in w)
    if _core.cpu_level() != "avx512":   # AVX2 keeps the file layout's kernel
        with pytest.raises(tokenmill.InvalidArgumentError, match="strip"):
            _testing.dot_rows_q8_0_strip(rows, xs)
        return
    wd = np.stack([_core.dequantize("q8_0", _core.quantize("q8_0", r), n) for r in w]).astype(np.float64)
    exact = xs.astype(np.float64) @ wd.T
    got = _testing.dot_rows_q8_0_strip(rows, xs)
    assert got.shape == (4, n_rows)
    assert np.all(np.abs(got - exact) <= 1e-6 * (np.abs(xs) @ np.abs(wd).T) + 1e-30)
    for nt in (1, 2, 3):   # the same bits with fewer tokens in the call
        assert np.array_equal(_testing.dot_rows_q8_0_strip(rows, xs[:nt]), got[:nt])
    assert np.array_equal(_testing.dot_rows_q8_0_strip(rows, xs[3:]), got[3:])


@pytest.mark.parametrize("int8", [False, True])
def test_q8_0_strips_on_amx_give_the_vnni_bits(int8):
    """The AMX strip kernels (1 to 16 tokens as tile rows) against the VNNI ones, four tokens per call:
    the same int32 block sums and float operations, so the same bits -- what keeps decode rows on AMX
    equal to one-token steps. Without AMX the kernels are absent, and say so."""
    rng = np.random.default_rng(11)
    n = 1536
    w = (rng.standard_normal((13, n)) * rng.uniform(0.01, 3, (13, 1))).astype(np.float32)
    rows = b"".join(_core.quantize("q8_0", r) for r in w)
    xs = (rng.standard_normal((16, n)) * rng.uniform(1e-3, 30, (16, 1))).astype(np.float32)
    xs[5, :64] = 0.0
    before = _core.cpu_level()
    _core.set_cpu_level(LEVELS[-1])
    try:
        amx = "amx_int8" in open("/proc/cpuinfo").read() and os.environ.get("TOKENMILL_AMX") != "0"
        if LEVELS[-1] != "avx512" or not amx:
            with pytest.raises(tokenmill.InvalidArgumentError):
                _testing.dot_rows_q8_0_strip(rows, xs, int8=int8, amx=True)
            return
        vnni = np.concatenate([_testing.dot_rows_q8_0_strip(rows, xs[t:t + 4], int8=int8) for t in range(0, 16, 4)])
        for nt in (1, 2, 5, 7, 9, 16):
            np.testing.assert_array_equal(_testing.dot_rows_q8_0_strip(rows, xs[:nt], int8=int8, amx=True), vnni[:nt],
                                          err_msg=f"{nt} tokens")
    finally:
        _core.set_cpu_level(before)


def _random_product(wtype, n_rows, n, n_tokens, seed):
    """Weights of wtype (rows of scales from 0.05 to 2) and x (rows from 1e-3 to 20 in size): the stored
    rows, x, and in float64 x times the dequantized rows and |x| times their magnitudes (the scale of
    float error)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n_rows, n)) * rng.uniform(0.05, 2, (n_rows, 1))).astype(np.float32)
    data = b"".join(_core.quantize(wtype, r) for r in w)
    x = (rng.standard_normal((n_tokens, n)) * rng.uniform(1e-3, 20, (n_tokens, 1))).astype(np.float32)
    wd = np.stack([_core.dequantize(wtype, _core.quantize(wtype, r), n) for r in w]).astype(np.float64)
    return data, x, x.astype(np.float64) @ wd.T, np.abs(x).astype(np.float64) @ np.abs(wd).T


@pytest.mark.parametrize("wtype,int8", [(t, i) for t in ("q4_0", "q4_1", "q5_0", "q5_1", "q4_k") for i in (False, True)])
def test_packed_rows_as_decode_are_one_token_steps_per_type(wtype, int8):
    """T rows as decode (a verification pass, a scheduler's step) have the bits of T one-token steps on
    every level, however their packed units run: the AVX-512 level takes two eight-row groups at once
    (the sixteen-row kernels) from a few tokens on and one group at a time below, and a weight of 40
    rows ends in a lone group. The products stay within float error of float64."""
    n_rows = 40
    data, x, exact, scale = _random_product(wtype, n_rows, 512, 9, seed=11)
    before = _core.cpu_level()
    try:
        for level in LEVELS:
            _core.set_cpu_level(level)
            def product(rows):
                return _testing.backend_matmul("cpu", wtype, data, n_rows, rows, "as_decode", int8=int8)
            steps = np.concatenate([product(x[t:t + 1]) for t in range(len(x))])
            for T in (2, 3, 4, 5, 9):
                np.testing.assert_array_equal(product(x[:T]), steps[:T], err_msg=f"{level}, {T} rows")
            assert np.all(np.abs(steps - exact) <= (2e-2 if int8 and level == "avx512" else 1e-5) * scale + 1e-30), level
    finally:
        _core.set_cpu_level(before)


@pytest.mark.parametrize("wtype,int8", [(t, i) for t in ("q4_0", "q4_1", "q5_0", "q4_k", "q8_0") for i in (False, True)])
def test_prefill_on_amx_is_decode_arithmetic(wtype, int8):
    """Where a weight's decode kernel of the same arithmetic runs on AMX -- exact, or int8 prefill and
    decode -- prefill takes it too: 37 prompt rows, fast or batch-invariant, are then the bits of 37
    one-token steps (the groups' B tiles laid out once for the three calls of sixteen tokens), and a chunk
    of them alone gives its rows' bits. Elsewhere prefill keeps the tiles. Exact products stay within float
    error of float64 everywhere."""
    n_rows = 48
    data, x, exact, scale = _random_product(wtype, n_rows, 512, 37, seed=5)
    before = _core.cpu_level()
    _core.set_cpu_level(LEVELS[-1])
    try:
        def product(rows, mode):
            return _testing.backend_matmul("cpu", wtype, data, n_rows, rows, mode, int8=int8)
        steps = np.concatenate([product(x[t:t + 1], "as_decode") for t in range(len(x))])
        fast, invariant = product(x, "fast"), product(x, "invariant")
        amx = "amx_int8" in open("/proc/cpuinfo").read() and os.environ.get("TOKENMILL_AMX") != "0"
        if LEVELS[-1] == "avx512" and amx:
            np.testing.assert_array_equal(fast, steps)
            np.testing.assert_array_equal(invariant, steps)
            np.testing.assert_array_equal(product(x[9:12], "invariant"), steps[9:12])
            np.testing.assert_array_equal(product(x, "as_decode"), steps)
        for got in (steps, fast, invariant):   # int8: x rounded to 8 bits per 32 values
            assert np.all(np.abs(got - exact) <= (2e-2 if int8 else 1e-5) * scale + 1e-30)
    finally:
        _core.set_cpu_level(before)


def _rounded_to_int8(x):
    """x rounded as prepare_x8's first part: per 32-block d = max|x| / 127, x ~ d * rint(x * (127 / max))."""
    blocks = x.reshape(-1, 32)
    mx = np.abs(blocks).max(axis=1, keepdims=True)
    inv = np.where(mx > 0, np.float32(127.0) / np.where(mx > 0, mx, 1), 0).astype(np.float32)
    return ((mx / np.float32(127.0)) * np.rint(blocks * inv)).astype(np.float64).reshape(x.shape)


def _assert_int8_tile_is_rounded_product(wtype, rows, wd, xs, packed=False):
    """The int8 prefill kernel on stored `rows` (dequantized: wd [n_rows, n]) against xs [8, n]: exactly
    the dequantized rows against x rounded to int8 per 32-block (float rounding aside) -- not, e.g., the
    unsigned quants against the rounding error, nor the unrounded product."""
    got = _testing.dot_rows_tile16(wtype, rows, xs, packed=packed)
    rounded = np.stack([_rounded_to_int8(x) for x in xs])
    assert got.shape == (8, wd.shape[0])
    np.testing.assert_allclose(got, rounded @ wd.T, rtol=0, atol=1e-5 * (np.abs(rounded) @ np.abs(wd).T).max())
    assert not np.allclose(got, xs.astype(np.float64) @ wd.T, rtol=1e-6, atol=0)   # it does round


def _check_int8_tile(wtype, w, rng, packed=False):
    """w [n_rows, n] quantized to wtype against eight vectors: ordinary, tiny, and one with a zero block
    (packed: the tile repacked from eight-row groups, not from the rows)."""
    n = w.shape[1]
    xs = rng.standard_normal((8, n)).astype(np.float32)
    xs[1] *= 1e-3
    xs[2, :32] = 0.0
    rows = [_core.quantize(wtype, r) for r in w]
    wd = np.stack([_core.dequantize(wtype, r, n) for r in rows]).astype(np.float64)
    _assert_int8_tile_is_rounded_product(wtype, b"".join(rows), wd, xs, packed)


# the levels with an int8 prefill kernel (AVX-512: VPDPBUSD; AVX2: VPMADDUBSW + VPMADDWD)
INT8_LEVELS = [lv for lv in LEVELS if lv != "scalar"]


@pytest.mark.parametrize("level", INT8_LEVELS, indirect=True)
@pytest.mark.parametrize("wtype,n", [(t, n) for t in ("q4_0", "q4_1") for n in (32, 1024)] +
                         [("q4_k", 1024), ("q5_0", 1024), ("q5_1", 1024)])
@pytest.mark.parametrize("n_rows", [8, 16])
def test_int8_prefill_kernel_is_the_rounded_product(level, wtype, n_rows, n):
    """The opt-in int8 prefill kernel computes exactly the dequantized rows against x rounded to int8
    per block (float rounding aside) -- not, e.g., the unsigned quants against the rounding error --
    from the eight-row groups decode reads."""
    rng = np.random.default_rng(n + n_rows)
    w = rng.standard_normal((n_rows, n)) * rng.uniform(0.02, 0.1, (n_rows, 1)) + 0.01
    _check_int8_tile(wtype, w.astype(np.float32), rng, packed=True)


@pytest.mark.parametrize("level", INT8_LEVELS, indirect=True)
@pytest.mark.parametrize("wtype", ["q8_0", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"])
@pytest.mark.parametrize("n_rows", [16, 5])
def test_int8_prefill_repacked_rows_kernel_is_the_rounded_product(level, wtype, n_rows):
    """The int8 prefill of q8_0, q5_* and the K-quants: exactly the dequantized rows (every block's or
    sub-block's scale and offset) against x rounded to int8 per 32-block, float rounding aside;
    padding rows stay out."""
    rng = np.random.default_rng(n_rows)
    w = (rng.standard_normal((n_rows, 768)) * rng.uniform(0.01, 2, (n_rows, 1)) + 0.01).astype(np.float32)
    _check_int8_tile(wtype, w, rng)


@pytest.mark.parametrize("level", INT8_LEVELS, indirect=True)
def test_int8_prefill_of_q8_0_takes_every_level_byte(level):
    """q8_0 quants span -128..127 in a file (quantizers write -127..127, other writers may not): rows of
    the extremes against x at its extremes, where a pair of products in AVX2's int16 sums comes
    closest to saturating (2 * 128 * 127)."""
    rng = np.random.default_rng(7)
    n = 256
    q = rng.choice(np.array([-128, -127, 127, 1, 0], np.int8), size=(16, n))
    q[0] = -128
    d = np.float16(0.01) * (1 + np.arange(16, dtype=np.float16))[:, None].repeat(n // 32, 1)
    rows = b"".join(b"".join(d[r, b].tobytes() + q[r, 32 * b:32 * b + 32].tobytes() for b in range(n // 32)) for r in range(16))
    wd = np.stack([_core.dequantize("q8_0", rows[r * n // 32 * 34:(r + 1) * n // 32 * 34], n) for r in range(16)])
    assert wd[0, 0] == np.float32(np.float16(0.01)) * -128
    xs = np.where(rng.random((8, n)) < 0.5, -1.0, 1.0).astype(np.float32) * rng.uniform(0.5, 3, (8, n)).astype(np.float32)
    _assert_int8_tile_is_rounded_product("q8_0", rows, wd.astype(np.float64), xs)


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("wtype", ["f16", "bf16", "q8_0", "q4_0", "q4_1", "nf4", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"])
def test_level_dequantize_is_exact(level, wtype):
    x = np.random.default_rng(5).standard_normal(256 * 19).astype(np.float32) * 3
    x[:256] *= np.linspace(-1, 1, 256, dtype=np.float32)   # some sub-blocks near zero, mins of both signs
    row = _core.quantize(wtype, x)
    np.testing.assert_array_equal(_testing.dequantize_active(wtype, row, x.size),
                                  _core.dequantize(wtype, row, x.size))


@pytest.mark.parametrize("level", LEVELS, indirect=True)
def test_level_gelu_erf_against_float64(level):
    x = np.concatenate([np.linspace(-12, 12, 4001), np.random.default_rng(3).standard_normal(997) * 4]).astype(np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(x.astype(np.float64))).numpy()   # 0.5 x (1 + erf(x / sqrt 2))
    got = _testing.gelu_erf_active(x)
    assert np.abs(got - want).max() < 2e-6 * max(1.0, np.abs(x).max() / 4)
    assert np.all(np.abs(got - want) <= 1e-6 + 2e-7 * np.abs(x))   # absolute error of erf times |x| / 2


@pytest.mark.parametrize("level", LEVELS, indirect=True)
def test_level_gelu_tanh_against_float64(level):
    rng = np.random.default_rng(4)
    x = np.concatenate([np.linspace(-12, 12, 4001), rng.standard_normal(997) * 4, [-1e4, 1e4, 0.0]]).astype(np.float32)
    up = rng.standard_normal(x.size).astype(np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(x.astype(np.float64)), approximate="tanh").numpy()
    got = _testing.gelu_tanh_active(x)
    assert np.all(np.abs(got - want) <= 1e-6 + 1e-6 * np.abs(want)), np.abs(got - want).max()
    np.testing.assert_allclose(_testing.gelu_tanh_active(x, up), want * up, rtol=2e-6, atol=1e-6)


def test_unknown_or_missing_level_is_an_error():
    with pytest.raises(tokenmill.InvalidArgumentError, match="unknown CPU level"):
        _core.set_cpu_level("sse9")


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("wtype", list(QTYPES))
def test_model_logits_agree_across_levels(tiny_models, tmp_path, level, wtype):
    _, hf_model = tiny_models["llama"]
    path = tmp_path / f"{wtype}.gguf"
    reference = write_tiny_gguf(hf_model, "llama", path, wtype)
    # 23 tokens: the prefill tiles (2 or 3 tokens wide) end with a partial one
    ids = np.random.default_rng(3).integers(0, 320, size=23).tolist()
    model = tokenmill.load(path)
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0].numpy()
    assert rel_err(model.logits(ids), ref) < 1e-4   # prefill path
    steps = [model.logits(ids[: i + 1])[-1] for i in range(19, 23)]   # decode-sized calls
    assert rel_err(np.stack(steps), ref[19:23]) < 1e-4


@pytest.mark.parametrize("level", LEVELS, indirect=True)
def test_default_model_parity_at_every_level(level, smollm, hf_smollm):
    hf_model, _ = hf_smollm
    ids = smollm.tokenize("The three primary colors are")
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    assert rel_err(smollm.logits(ids), ref) < 1e-4
    greedy = tokenmill.GenerateConfig(max_new_tokens=16, temperature=0, ignore_eos=True)
    out = tokenmill.Generator(smollm, greedy).generate(ids)
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out == expected[0, len(ids):].tolist()


@pytest.mark.parametrize("level", LEVELS, indirect=True)
def test_sizes_off_the_tile_grid(level, tmp_path):
    """Matrices whose rows are no multiple of any tile height (36 FFN rows, 317 vocabulary rows) and a
    prompt no multiple of any tile width: the padding rows and the repeated last token stay out of
    the results."""
    torch.manual_seed(5)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=36, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, initializer_range=0.08, **dict(TINY, vocab_size=317))
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ids = np.random.default_rng(4).integers(0, 317, size=41).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    model = tokenmill.load(tmp_path)
    assert rel_err(model.logits(ids), ref) < 1e-4
    assert rel_err(model.logits(ids, chunk=3), ref) < 1e-4   # every call a tile of its own


@pytest.mark.parametrize("level", LEVELS, indirect=True)
def test_rows_longer_than_a_column_chunk(level, tmp_path):
    """An FFN wider than prefill's column chunk (960 values): the down projection's rows run in three
    chunks (704, 704, 672) whose partial sums add up, in f32 against transformers and in q4_0
    (dequantized from the eight-row layout on AVX-512) against the token-by-token decode kernels."""
    torch.manual_seed(6)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=2080, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, initializer_range=0.08, **TINY)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, size=37).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert rel_err(tokenmill.load(tmp_path).logits(ids), ref) < 1e-4
    q4 = tokenmill.load(tmp_path, weights="q4_0")
    assert rel_err(q4.logits(ids), q4.logits(ids, chunk=1)) < 1e-4


@pytest.mark.parametrize("wtype", ["q4_0", "q4_1"])
def test_int8_prefill_model(wtype, tmp_path):
    """load(int8_prefill=True): prompts of 8+ tokens run the int8 kernel on 4-bit weights (a Qwen2
    shape: q/k/v biases, an FFN of three column chunks, 328 vocabulary rows = 20 full 16-row units and
    a half one); its logits stay near the exact ones (measured 2.6e-2 of their range here, llama.cpp's
    q8 activations give 4-6e-2 on SmolLM2) with the same top tokens, and decode is untouched."""
    torch.manual_seed(7)
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=2080, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, initializer_range=0.08, **dict(TINY, vocab_size=328))
    transformers.Qwen2ForCausalLM(cfg).eval().save_pretrained(tmp_path, safe_serialization=True)
    ids = np.random.default_rng(8).integers(0, 328, size=29).tolist()
    before = _core.cpu_level()
    try:
        for level in INT8_LEVELS:
            _core.set_cpu_level(level)
            exact = tokenmill.load(tmp_path, weights=wtype)
            fast = tokenmill.load(tmp_path, weights=wtype, int8_prefill=True)
            want, got = exact.logits(ids), fast.logits(ids)
            assert 1e-5 < rel_err(got, want) < 4e-2, level
            assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
            np.testing.assert_array_equal(fast.logits(ids, chunk=1), exact.logits(ids, chunk=1))
        _core.set_cpu_level("scalar")   # no int8 kernel there: the exact path runs
        np.testing.assert_array_equal(tokenmill.load(tmp_path, weights=wtype, int8_prefill=True).logits(ids),
                                      tokenmill.load(tmp_path, weights=wtype).logits(ids))
    finally:
        _core.set_cpu_level(before)


def test_batched_decode_rows_are_one_token_steps_at_every_level(default_gguf):
    """A scheduler's decode rows and a verification pass (several tokens in one pass: four per kernel
    call sharing the unpacking of each unit of two weight groups on AVX-512, sixteen per call on AMX
    where the CPU has it, then the one left over) are the one-token steps bit for bit."""
    before = _core.cpu_level()
    try:
        for level in LEVELS:
            _core.set_cpu_level(level)
            model = tokenmill.load(default_gguf)
            ids = model.tokenize("The quick brown fox jumps over the lazy dog. " * 6)[:48]
            cache = model.new_cache(64)
            model.eval(cache, ids[:30])
            steps = np.array([model.eval(cache, [t]).logits[0] for t in ids[30:47]])
            cache = model.new_cache(64)
            model.eval(cache, ids[:30])
            np.testing.assert_array_equal(model.eval(cache, ids[30:47], "all", decode_exact=True).logits, steps,
                                          err_msg=level)
            caches = [model.new_cache(64) for _ in range(17)]
            for i, c in enumerate(caches):   # the history of step i: the prompt, then i steps
                model.eval(c, ids[:30])
                for t in ids[30:30 + i]:
                    model.eval(c, [t])
            rows = model.eval_batch(caches, [[t] for t in ids[30:47]], "last", batch_invariant=True, decode_rows=17).logits
            np.testing.assert_array_equal(rows, steps, err_msg=level)
    finally:
        _core.set_cpu_level(before)


@pytest.mark.parametrize("weights", ["q8_0", "q4_1"])
@pytest.mark.parametrize("int8", [False, True])
def test_decode_rows_off_the_sixteen_row_grid(tmp_path, weights, int8):
    """Seventeen decode rows in one pass on a model whose output matrix has 328 rows (the AMX and
    VNNI units' last one holds eight) and whose rows hold 96 values (an odd count of blocks, for the
    Q8_0 kernels' block pairs): every row is the one-token step bit for bit, at the default level."""
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=328, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    model = tokenmill.load(tmp_path, weights=weights, int8_decode=int8)
    ids = list(range(5, 35))
    cache = model.new_cache(128)
    model.eval(cache, ids[:13], logits=None)
    steps = np.stack([model.eval(cache, [t]).logits[0] for t in ids[13:30]])
    cache = model.new_cache(128)
    model.eval(cache, ids[:13], logits=None)
    np.testing.assert_array_equal(model.eval(cache, ids[13:30], logits="all", decode_exact=True).logits, steps)


@pytest.mark.skipif("avx512" not in LEVELS, reason="the int8 decode kernel needs AVX-512 VNNI")
def test_int8_decode_model(default_gguf, smollm):
    """load(int8_decode=True): one-token steps on 4-bit weights take x rounded to int8 (llama.cpp's
    decode precision): near the exact logits, and rows computed as decode (a verification pass, a
    scheduler's batch of decode rows, several tokens per kernel call) are those steps bit for bit."""
    before = _core.cpu_level()
    _core.set_cpu_level("avx512")
    try:
        fast = tokenmill.load(default_gguf, int8_decode=True)
        ids = fast.tokenize("The quick brown fox jumps over the lazy dog. " * 6)[:48]
        assert len(ids) == 48
        steps, exact_steps = [], []
        for model, out in ((fast, steps), (smollm, exact_steps)):
            cache = model.new_cache(64)
            model.eval(cache, ids[:30])
            out += [model.eval(cache, [t]).logits[0] for t in ids[30:47]]
        steps, exact_steps = np.array(steps), np.array(exact_steps)
        assert 1e-4 < rel_err(steps, exact_steps) < 6e-2
        assert (steps.argmax(-1) == exact_steps.argmax(-1)).mean() >= 0.9
        cache = fast.new_cache(64)
        fast.eval(cache, ids[:30])
        np.testing.assert_array_equal(fast.eval(cache, ids[30:47], "all", decode_exact=True).logits, steps)
        # seventeen sequences' decode rows in one pass: each is its own one-token step
        caches = [fast.new_cache(64) for _ in range(17)]
        for i, c in enumerate(caches):   # the same history as the steps: a prompt, then i steps
            fast.eval(c, ids[:30])
            for t in ids[30:30 + i]:
                fast.eval(c, [t])
        rows = fast.eval_batch(caches, [[t] for t in ids[30:47]], "last", batch_invariant=True, decode_rows=17).logits
        np.testing.assert_array_equal(rows, steps)
    finally:
        _core.set_cpu_level(before)


@pytest.mark.skipif("avx512" not in LEVELS, reason="the int8 decode kernels need AVX-512 VNNI")
@pytest.mark.parametrize("n", [32, 96, 576])
def test_int8_decode_q8_0_kernel_is_the_rounded_product(n):
    """int8_decode's q8_0 kernel (two blocks per VPDPBUSD, x offset to unsigned): the dequantized rows
    against x rounded to int8 per block, float rounding aside -- also for quants of -128, which no
    quantizer writes but a file may hold, and an odd last block -- and the same bits in every tile of
    rows x tokens, which is what makes batched decode rows one-token steps."""
    rng = np.random.default_rng(n)
    w = (rng.standard_normal((7, n)) * rng.uniform(0.01, 2, (7, 1))).astype(np.float32)
    rows = bytearray(b"".join(_core.quantize("q8_0", r) for r in w))
    rows[2:34] = np.full(32, -128, np.int8).tobytes()   # row 0, block 0: every quant -128
    rows = bytes(rows)
    wd = np.stack([_core.dequantize("q8_0", rows[i * len(rows) // 7:(i + 1) * len(rows) // 7], n)
                   for i in range(7)]).astype(np.float64)
    assert np.all(wd[0, :32] == wd[0, 0]) and wd[0, 0] < 0
    xs = rng.standard_normal((6, n)).astype(np.float32)
    xs[1] *= 1e-3
    xs[2, :32] = 0.0
    before = _core.cpu_level()
    _core.set_cpu_level("avx512")
    try:
        got = _testing.dot_rows_q8_0_int8(rows, xs)
        rounded = np.stack([_rounded_to_int8(x) for x in xs])
        np.testing.assert_allclose(got, rounded @ wd.T, rtol=0, atol=1e-6 * (np.abs(rounded) @ np.abs(wd).T).max())
        assert not np.allclose(got, xs.astype(np.float64) @ wd.T, rtol=1e-6, atol=0)   # it does round
        for nr in range(1, 5):
            for nt in range(1, 5):
                np.testing.assert_array_equal(_testing.dot_rows_q8_0_int8(rows, xs, nr, nt), got, err_msg=f"{nr}x{nt}")
        # the strips of sixteen rows (what decode reads at this level) give the file layout's bits
        for nt in range(1, 5):
            for t0 in range(0, 6, nt):
                np.testing.assert_array_equal(_testing.dot_rows_q8_0_strip(rows, xs[t0:t0 + nt], int8=True),
                                              got[t0:t0 + nt], err_msg=f"strip, {nt} tokens")
    finally:
        _core.set_cpu_level(before)


def _extreme_kquant_row(wtype):
    """Two super-blocks whose every weight has the largest |quant x sub-block scale| the type allows
    (q6_k: q - 32 = -32 with scale -128; q4_k / q5_k: q = 15 / 31 with scale 63), where the integer
    kernels' int32 sums come closest to overflowing."""
    block = {"q4_k": 144, "q5_k": 176, "q6_k": 210}[wtype]
    raw = np.zeros((2, block), np.uint8)
    if wtype == "q6_k":
        raw[:, 192:208] = np.array([-128] * 16, np.int8).view(np.uint8)   # scales; ql = qh = 0: q = 0 - 32
        raw[:, 208:210] = np.array([0.5], np.float16).view(np.uint8)
    else:
        raw[:, 0:2] = np.array([0.5], np.float16).view(np.uint8)
        raw[:, 2:4] = np.array([0.25], np.float16).view(np.uint8)
        raw[:, 4:16] = 0xFF   # every 6-bit scale and min 63
        raw[:, 16 if wtype == "q4_k" else 48:] = 0xFF   # every quant 15 (and its fifth bit set)
    return raw.tobytes()


@pytest.mark.parametrize("level", [lv for lv in LEVELS if lv != "scalar"], indirect=True)
@pytest.mark.parametrize("wtype", ["q4_k", "q5_k", "q6_k"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_kquant_sums_do_not_overflow(level, wtype, sign):
    row = _extreme_kquant_row(wtype)
    wd = _core.dequantize(wtype, row, 512).astype(np.float64)
    assert np.abs(wd).max() > 0
    x = np.full(512, sign * 3.0, np.float32)   # every x at its block maximum: hi = +-32767
    exact = float(wd @ x.astype(np.float64))
    for got in (_testing.dot_row(wtype, row, x), *_testing.dot_row_x4(wtype, row, np.stack([x] * 4))):
        assert abs(got - exact) <= 1e-6 * abs(exact)


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("wtype", ["q2_k", "q3_k", "iq4_nl"])
def test_read_only_types_kernels_match_float64(level, wtype):
    """q2_k, q3_k and iq4_nl have no quantizer here (they are read, not written): random blocks with
    realistic scales, at every level -- the decode dot (one and four vectors), the dequantization, and
    the int8 prefill tile against the rounded x (q2_k has none)."""
    from gguf_util import random_blocks

    rng = np.random.default_rng(11)
    n = 768
    block = 32 if wtype == "iq4_nl" else 256
    rows = [random_blocks(wtype, n // block, 1.0, rng).tobytes() for _ in range(16)]
    wd = np.stack([_core.dequantize(wtype, r, n) for r in rows]).astype(np.float64)
    xs = rng.standard_normal((8, n)).astype(np.float32)
    np.testing.assert_array_equal(_testing.dequantize_active(wtype, rows[0], n), wd[0].astype(np.float32))
    exact = xs.astype(np.float64) @ wd.T
    bound = 1e-5 * (np.abs(xs) @ np.abs(wd).T) + 1e-6
    for prepared in (True, False):
        got = np.array([_testing.dot_row(wtype, rows[r], xs[0], prepared=prepared) for r in range(16)])
        assert np.all(np.abs(got - exact[0]) <= bound[0])
    if level != "scalar":
        assert np.all(np.abs(_testing.dot_row_x4(wtype, rows[1], xs[:4]) - exact[:4, 1]) <= bound[:4, 1])
    if level != "scalar" and wtype != "q2_k":
        _assert_int8_tile_is_rounded_product(wtype, b"".join(rows), wd, xs)
