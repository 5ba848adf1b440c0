"""Quantized KV caches: each kind against a NumPy reference of its quantization, attention over the
stored kinds against dequantize-then-attend, the fp16 ring, rollback, sizes, decode plans, and the
quality-gated automatic choice with its persisted plan."""

import json
import time

import numpy as np
import pytest
import torch
import transformers

import tokenmill
from tokenmill import GenerateConfig, Generator, _core, _testing
from tokenmill.engine.cache import CACHE_KINDS
from tokenmill.generation import cache_plan
from tokenmill.generation.cache_plan import SPEED_TIE, compare_logits
from conftest import rel_err

NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float32)
STORAGE = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "q8": "q8_0", "q4": "q4_0", "nf4": "nf4"}


# ---- references of each kind's round trip (float32 in, the values attention sees out)

def _bf16(x):
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def _q8(x):
    b = x.reshape(-1, 32)
    d = (np.abs(b).max(axis=1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    inv = np.divide(1.0, np.abs(b).max(axis=1, keepdims=True) / 127, where=d != 0, out=np.zeros_like(d))
    q = np.trunc(b * inv + np.copysign(0.5, b * inv))   # round half away from zero
    return (d * q).reshape(x.shape)


def _q4(x):
    b = x.reshape(-1, 32)
    vmax = b[np.arange(len(b)), np.abs(b).argmax(axis=1)][:, None]
    d32 = vmax / -8
    inv = np.divide(1.0, d32, where=d32 != 0, out=np.zeros_like(d32))
    q = np.minimum(15, np.floor(b * inv + 8.5)) - 8
    return (d32.astype(np.float16).astype(np.float32) * q).reshape(x.shape)


def _nf4_codes(x):
    b = x.reshape(-1, 32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    inv = np.divide(np.float32(1), amax, where=amax != 0, out=np.zeros_like(amax))
    codes = np.abs((b * inv)[..., None] - NF4).argmin(axis=-1)   # first of equals, as the kernel
    return amax.astype(np.float16), codes


def _nf4(x):
    scale, codes = _nf4_codes(x)
    return (scale.astype(np.float32) * NF4[codes]).reshape(x.shape)


ROUND_TRIP = {
    "fp32": lambda x: x,
    "fp16": lambda x: x.astype(np.float16).astype(np.float32),
    "bf16": _bf16,
    "q8": _q8,
    "q4": _q4,
    "nf4": _nf4,
}


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_each_kind_round_trips_like_its_numpy_reference(kind):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(32 * 64) * rng.uniform(0.01, 5, size=32 * 64)).astype(np.float32)
    x[:32] = 0.0   # an all-zero block
    t = STORAGE[kind]
    got = _core.dequantize(t, _core.quantize(t, x), x.size)
    np.testing.assert_array_equal(got, ROUND_TRIP[kind](x))


def test_nf4_blocks_are_scale_then_packed_codes():
    x = np.random.default_rng(8).standard_normal(64).astype(np.float32)
    raw = np.frombuffer(_core.quantize("nf4", x), dtype=np.uint8).reshape(2, 18)
    scale, codes = _nf4_codes(x)
    np.testing.assert_array_equal(raw[:, :2].copy().view(np.float16), scale)
    np.testing.assert_array_equal(raw[:, 2:] & 0x0F, codes[:, :16])
    np.testing.assert_array_equal(raw[:, 2:] >> 4, codes[:, 16:])


# ---- attention over stored kinds

def _reference_attention(q, k, v, n_heads, n_kv_heads, window):
    """float64 causal attention of the last T of N positions."""
    T, N = q.shape[0], k.shape[0]
    hd = q.shape[1] // n_heads
    group = n_heads // n_kv_heads
    out = np.zeros((T, n_heads * hd))
    for t in range(T):
        pos = N - T + t
        lo = max(0, pos - window + 1) if window > 0 else 0
        for h in range(n_heads):
            kh = h // group
            qh = q[t, h * hd : (h + 1) * hd].astype(np.float64)
            keys = k[lo : pos + 1, kh * hd : (kh + 1) * hd].astype(np.float64)
            vals = v[lo : pos + 1, kh * hd : (kh + 1) * hd].astype(np.float64)
            s = keys @ qh / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h * hd : (h + 1) * hd] = p @ vals / p.sum()
    return out


def _qkv(T, N, n_heads=9, n_kv_heads=3, hd=64, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((T, n_heads * hd)).astype(np.float32)
    k = (rng.standard_normal((N, n_kv_heads * hd)) * 1.5).astype(np.float32)
    v = rng.standard_normal((N, n_kv_heads * hd)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("level", _core.cpu_levels())
@pytest.mark.parametrize("k_kind,v_kind", [(k, k) for k in CACHE_KINDS] + [("q8", "nf4"), ("fp16", "q4")])
@pytest.mark.parametrize("T,N,window", [(1, 700, 0), (5, 40, 0), (3, 300, 100), (37, 37, 0), (16, 90, 0), (21, 300, 100)])
def test_attention_reads_stored_kinds_like_dequantize_then_attend(level, k_kind, v_kind, T, N, window):
    """Decode (T=1 over a long context: positions split across threads), a short prefill, and a
    window; prefills of 8 rows or more (a whole prompt, one after earlier positions, one in a window)
    take the blocked path (transposed keys, scores of 5 rows x 3 query heads per product); the
    reference attends over the round-tripped K and V in float64."""
    q, k, v = _qkv(T, N)
    before = _core.cpu_level()
    _core.set_cpu_level(level)
    try:
        got = _testing.attention(q, k, v, 9, 3, k_kind, v_kind, window=window, n_threads=2)
    finally:
        _core.set_cpu_level(before)
    ref = _reference_attention(q, ROUND_TRIP[k_kind](k), ROUND_TRIP[v_kind](v), 9, 3, window)
    assert np.abs(got - ref).max() < 2e-5


@pytest.mark.parametrize("level", _core.cpu_levels())
@pytest.mark.parametrize("kind", ["fp32", "fp16"])
@pytest.mark.parametrize("n_heads,n_kv_heads,hd", [(14, 2, 64), (8, 1, 80), (10, 2, 72), (4, 4, 128), (16, 2, 24)])
def test_decode_attention_over_query_groups_of_any_size(level, kind, n_heads, n_kv_heads, hd):
    """Decode rows read each K and V row once for their whole GQA group (four query heads per pass
    at the AVX-512 level): groups of 7, 8, 5, 1 and 8 heads, and head sizes that are not multiples of
    64 or 16, against float64."""
    T, N = 3, 260
    q, k, v = _qkv(T, N, n_heads, n_kv_heads, hd, seed=7)
    before = _core.cpu_level()
    _core.set_cpu_level(level)
    try:
        got = _testing.attention(q, k, v, n_heads, n_kv_heads, kind, kind, n_threads=2)
    finally:
        _core.set_cpu_level(before)
    ref = _reference_attention(q, ROUND_TRIP[kind](k), ROUND_TRIP[kind](v), n_heads, n_kv_heads, 0)
    assert np.abs(got - ref).max() < 2e-5


@pytest.mark.parametrize("ring", [1, 3, 16, 64])
def test_fp16_ring_serves_the_newest_positions(ring):
    """Every position is quantized into the main store; the newest `ring` are read from fp16
    copies, including ones written by the earlier call."""
    T, N = 4, 130
    q, k, v = _qkv(T, N, seed=1)
    got = _testing.attention(q, k, v, 9, 3, "q4", "q4", ring=ring, n_threads=2)
    kr, vr = _q4(k), _q4(v)
    kr[N - ring :], vr[N - ring :] = ROUND_TRIP["fp16"](k[N - ring :]), ROUND_TRIP["fp16"](v[N - ring :])
    ref = _reference_attention(q, kr, vr, 9, 3, 0)
    assert np.abs(got - ref).max() < 2e-5


def test_attention_rejects_bad_shapes():
    q, k, v = _qkv(2, 10)
    with pytest.raises(tokenmill.InvalidArgumentError):
        _testing.attention(q, k[:, :64], v, 9, 3)
    with pytest.raises(tokenmill.InvalidArgumentError, match="unknown KV cache kind"):
        _testing.attention(q, k, v, 9, 3, "q3")


# ---- caches of a real model

def test_bytes_per_token_and_allocation_agree(smollm):
    hp = smollm.hparams
    rows = hp.n_layer * hp.n_head_kv * 2   # K and V rows per token
    per_row = {"fp32": 256, "fp16": 128, "bf16": 128, "q8": 68, "q4": 36, "nf4": 36}   # head_dim 64
    for kind in CACHE_KINDS:
        assert smollm.kv_bytes_per_token(kind) == rows * per_row[kind]
        cache = smollm.new_cache(300, tokenmill.CacheSpec(kind, kind))
        assert cache.bytes == 300 * smollm.kv_bytes_per_token(kind)
    spec = tokenmill.CacheSpec("q8", "q4", residual_len=32, fp16_prefix_layers=2)
    cache = smollm.new_cache(300, spec)
    per_token = smollm.kv_bytes_per_token("q8", "q4", fp16_prefix_layers=2)
    assert per_token == hp.n_head_kv * (2 * 2 * 128 + (hp.n_layer - 2) * (68 + 36))
    ring = (hp.n_layer - 2) * 2 * (32 + 16) * hp.n_head_kv * 64 * 2   # residual + rollback slack, fp16
    assert cache.bytes == 300 * per_token + ring == spec.cache_bytes(smollm, 300)


def test_quantized_kinds_need_block_sized_heads(tiny_models):
    model = tokenmill.load(tiny_models["llama"][0])   # head_dim 16
    assert model.supports_cache_kind("fp16") and not model.supports_cache_kind("q8")
    with pytest.raises(tokenmill.InvalidArgumentError, match="multiple of 32"):
        model.logits([1, 2, 3], cache_kind="q8")


def test_batch_invariant_prompt_rows_do_not_depend_on_chunks_or_neighbours(smollm):
    """A batch-invariant pass's prompt rows (the scheduler's) take blocked attention whatever their
    number: a prompt in one pass, in chunks of 1 to 22 rows, or beside a decode row and another prompt,
    gives the same logits bit for bit."""
    ids = np.random.default_rng(4).integers(100, 40000, size=40).tolist()
    whole = smollm.eval(smollm.new_cache(64), ids, logits="all", batch_invariant=True).logits
    for sizes in ([1] * 9 + [31], [5, 13, 22], [21, 19]):
        cache, parts, at = smollm.new_cache(64), [], 0
        for n in sizes:
            parts.append(smollm.eval(cache, ids[at:at + n], logits="all", batch_invariant=True).logits)
            at += n
        np.testing.assert_array_equal(np.concatenate(parts), whole, err_msg=str(sizes))
    decoding, other = smollm.new_cache(64), smollm.new_cache(64)
    smollm.eval(decoding, ids[:7], logits=None)
    rows = smollm.eval_batch([decoding, smollm.new_cache(64), other], [[ids[7]], ids, ids[:3]], logits="all",
                             batch_invariant=True, decode_rows=1).logits
    np.testing.assert_array_equal(rows[1:41], whole)


def test_fp16_cache_logits_stay_close_and_chunking_changes_nothing(smollm):
    ids = smollm.tokenize("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer")
    full = smollm.logits(ids)
    assert rel_err(smollm.logits(ids, chunk=1), full) < 1e-5
    assert rel_err(smollm.logits(ids, chunk=5), full) < 1e-5
    assert rel_err(smollm.logits(ids, "fp16", chunk=1), full) < 5e-3
    q8 = smollm.logits(ids, "q8", chunk=1)
    assert 0 < rel_err(q8, full) < 5e-2
    assert (q8.argmax(-1) == full.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("spec", [("q8", "q8", 0), ("nf4", "q4", 0), ("q4", "q4", 6)])
def test_rollback_replays_identically(smollm, spec):
    k_kind, v_kind, ring = spec
    ids = np.array(smollm.tokenize("The quick brown fox jumps over the lazy dog. " * 3), dtype=np.int32)
    cache = smollm.new_cache(64, tokenmill.CacheSpec(k_kind, v_kind, residual_len=ring))
    smollm.eval(cache, ids[:20], logits=None)
    first = [smollm.eval(cache, ids[t : t + 1]).logits[0] for t in range(20, 30)]
    # back 6 tokens: the ring still holds fp16 copies of what the first run read from it
    cache.truncate(24)
    again = [smollm.eval(cache, ids[t : t + 1]).logits[0] for t in range(24, 30)]
    np.testing.assert_array_equal(np.stack(again), np.stack(first[4:]))


def test_local_window_matches_transformers_sliding_window(tiny_models):
    directory, _ = tiny_models["mistral"]
    cfg = transformers.AutoConfig.from_pretrained(directory)
    cfg.sliding_window = 10   # narrower than the model's own 24: the window we ask for applies
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, config=cfg, attn_implementation="eager").eval()
    ids = np.random.default_rng(3).integers(0, 320, size=40).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    model = tokenmill.load(directory)
    gen = Generator(model, decode_plan="fixed", decode_local_window=10, decode_q_chunk=7, temperature=0)
    gen.prefill(ids)
    assert rel_err(gen._seq.logits, ref[-1]) < 1e-4
    windowed = tokenmill.CacheSpec(local_window=10)
    cache = model.new_cache(40, windowed)
    got = model.eval(cache, ids, "all").logits
    assert rel_err(got, ref) < 1e-4
    assert rel_err(model.logits(ids), ref) > 1e-3   # without the window the answer differs


def test_decode_plans_pick_chunks_and_windows(tiny_models):
    model = tokenmill.load(tiny_models["llama"][0], n_ctx=256)
    ids = np.random.default_rng(4).integers(0, 320, size=50).tolist()
    plain = Generator(model, decode_plan="none", temperature=0).generate(ids, max_new_tokens=12)
    chunked = Generator(model, decode_plan="fixed", decode_q_chunk=8, temperature=0)
    assert chunked.generate(ids, max_new_tokens=12) == plain
    auto = Generator(model, decode_plan="auto", decode_bucket_short=64, decode_bucket_mid=128, decode_q_chunk=16,
                     decode_local_window=20, temperature=0)
    assert (auto._seq.q_chunk, auto._seq.cache.config.local_window) == (16, 20)   # 256 > mid
    short = Generator(model, decode_plan="auto", max_seq_len=64, decode_local_window=20)
    assert (short._seq.q_chunk, short._seq.cache.config.local_window) == (None, 0)
    mid = Generator(model, decode_plan="auto", max_seq_len=100, decode_bucket_short=64, decode_local_window=20)
    assert (mid._seq.q_chunk, mid._seq.cache.config.local_window) == (256, 0)


def test_generator_uses_the_configured_kinds(smollm):
    gen = Generator(smollm, cache_kind="q8", cache_kind_v="nf4", cache_residual_len=16, max_seq_len=128, temperature=0)
    assert (gen.cache_plan.k_kind, gen.cache_plan.v_kind, gen.cache_plan.source) == ("q8", "nf4", "fixed")
    # memory follows the context: nothing before the first call, room for prompt + max_new_tokens after it
    assert gen.cache_bytes == gen._seq.cache.bytes < tokenmill.CacheSpec("q8", "nf4", 16).cache_bytes(smollm, 128)
    out = gen.generate("The capital of France is", max_new_tokens=8)
    full = tokenmill.CacheSpec("q8", "nf4", 16).cache_bytes(smollm, 128)
    assert gen._seq.cache.allocated == 64 and 0 < gen.cache_bytes < full
    assert len(out) == 8
    with pytest.raises(tokenmill.InvalidArgumentError, match="pass them to the Generator"):
        gen.generate("more", cache_kind="fp16")


@pytest.mark.parametrize("bad", [
    {"cache_kind": "q3"}, {"cache_kind_k": "auto"}, {"cache_budget_mb": 0}, {"cache_residual_len": -1},
    {"cache_quality_max_ppl_ratio": 0.5}, {"cache_quality_min_top1": 2}, {"decode_plan": "fast"},
    {"decode_q_chunk": 0}, {"decode_bucket_short": 100, "decode_bucket_mid": 50}, {"cache_plan_path": 3},
])
def test_cache_settings_are_validated(bad):
    with pytest.raises(tokenmill.InvalidArgumentError):
        GenerateConfig(**bad)


# ---- auto selection

AUTO = dict(cache_kind="auto", max_seq_len=256, cache_quality_prompt_len=48, cache_quality_decode_steps=12,
            cache_auto_bench_steps=2, cache_auto_bench_prompt_len=16)


def test_auto_gates_on_quality_and_reports_every_candidate(smollm):
    plan = Generator(smollm, **AUTO, cache_plan_probe=False, cache_auto_benchmark=False).cache_plan
    assert plan.source == "measured"
    by_kind = {(c.k_kind, c.v_kind): c for c in plan.candidates}
    assert set(by_kind) >= {("q4", "q4"), ("q8", "q8"), ("fp16", "fp16"), ("fp32", "fp32")}
    mbs = [c.cache_mb for c in plan.candidates]
    assert mbs == sorted(mbs)
    q4 = by_kind[("q4", "q4")]
    assert q4.passed_quality is False and q4.mean_kl > 0.05   # 4-bit keys are too lossy for the default gates
    chosen = by_kind[(plan.k_kind, plan.v_kind)]
    assert chosen.passed_quality and chosen.mean_kl <= 0.05 and chosen.top1_agreement >= 0.9
    # without benchmarking the smallest passing candidate wins: everything smaller failed
    assert all(c.passed_quality is False for c in plan.candidates if c.cache_mb < chosen.cache_mb)
    # a strict gate leaves only the (near-)exact kinds
    strict = Generator(smollm, **AUTO, cache_auto_benchmark=False, cache_quality_max_mean_kl=1e-6).cache_plan
    assert (strict.k_kind, strict.v_kind) in {("fp16", "fp16"), ("fp32", "fp32"), ("bf16", "bf16")}


def test_auto_budget_filter(smollm):
    per_token_mb = smollm.kv_bytes_per_token("q8") / 2**20
    plan = Generator(smollm, **AUTO, cache_budget_mb=per_token_mb * 256 * 1.01, cache_auto_benchmark=False).cache_plan
    fits = [c for c in plan.candidates if c.fits_budget]
    assert {(c.k_kind, c.v_kind) for c in fits} <= {("q4", "q4"), ("nf4", "nf4"), ("q8", "q4"), ("q8", "nf4"), ("q8", "q8")}
    assert all(c.passed_quality is None for c in plan.candidates if not c.fits_budget)
    with pytest.raises(tokenmill.InvalidArgumentError, match="no KV cache kind fits cache_budget_mb"):
        Generator(smollm, **AUTO, cache_budget_mb=0.01)


def test_auto_benchmark_picks_the_fastest_survivor(smollm):
    plan = Generator(smollm, **AUTO, cache_quality_max_mean_kl=1.0, cache_quality_max_delta_nll=10,
                     cache_quality_max_ppl_ratio=100, cache_quality_min_top1=0, cache_plan_probe=False).cache_plan
    timed = [c for c in plan.candidates if c.decode_tokens_per_second is not None]
    assert len(timed) == len(plan.candidates)   # everything passed, everything was timed
    fastest = max(c.decode_tokens_per_second for c in timed)
    assert [c.cache_mb for c in timed] == sorted(c.cache_mb for c in timed)
    # the smallest cache that is within the tie margin of the fastest
    expected = next(c for c in timed if c.decode_tokens_per_second >= (1 - SPEED_TIE) * fastest)
    assert (plan.k_kind, plan.v_kind) == (expected.k_kind, expected.v_kind)


def test_plan_persists_is_reused_and_reprobed(smollm, tmp_path):
    path = tmp_path / "plans" / "cache_plans.json"
    settings = dict(AUTO, cache_auto_benchmark=False, cache_plan_path=str(path), cache_quality_decode_steps=13)
    first = Generator(smollm, **settings).cache_plan
    assert first.source == "measured" and path.exists()
    saved = json.loads(path.read_text())
    assert saved["plans"][first.key]["k_kind"] == first.k_kind
    cache_plan._measured.clear()   # a new process would only have the file
    again = Generator(smollm, **settings).cache_plan
    assert again.source == "file" and (again.k_kind, again.v_kind, again.created) == (first.k_kind, first.v_kind, first.created)
    time.sleep(0.01)
    cache_plan._measured.clear()
    reprobed = Generator(smollm, **settings, cache_plan_probe_interval_sec=0).cache_plan
    assert reprobed.source == "measured" and reprobed.created > first.created
    # other settings, other key: both plans live in the file
    Generator(smollm, **dict(settings, cache_budget_mb=100.0))
    assert len(json.loads(path.read_text())["plans"]) == 2


def test_corrupt_plan_file_is_ignored_with_a_warning(smollm, tmp_path):
    path = tmp_path / "plans.json"
    path.write_text("{not json")
    cache_plan._measured.clear()
    with pytest.warns(RuntimeWarning, match="ignoring the cache plan file"):
        plan = Generator(smollm, **AUTO, cache_auto_benchmark=False, cache_plan_path=str(path)).cache_plan
    assert plan.source == "measured"
    assert json.loads(path.read_text())["version"] == 1   # rewritten whole


def test_compare_logits_metrics():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 50)).astype(np.float32)
    targets = rng.integers(0, 50, size=6)
    same = compare_logits(base, base, targets)
    assert same["delta_nll"] == 0 and same["ppl_ratio"] == 1 and same["mean_kl"] == 0 and same["top1_agreement"] == 1
    shifted = compare_logits(base, base + rng.standard_normal((6, 50)).astype(np.float32), targets)
    lb = base - np.log(np.exp(base).sum(-1, keepdims=True))
    assert shifted["nll_base"] == pytest.approx(-lb[np.arange(6), targets].mean(), rel=1e-6)
    assert shifted["mean_kl"] > 0
