"""The native sampler against a NumPy reference of the documented pipeline: penalties -> logit bias
-> temperature -> top-k -> top-p -> min-p -> typical-p -> draw. Property tests check the filtered
distribution exactly; a chi-square test checks that draws follow it."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats

import tokenmill
from tokenmill import _core


def make_params(**kw):
    p = _core.SamplerParams()
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def reference(logits, history=(), temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
              repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, repeat_last_n=64,
              logit_bias=()):
    """Returns (probabilities over the vocabulary, smallest margin to a filter threshold)."""
    f32 = np.float32
    z = np.array(logits, dtype=f32)
    window = list(history) if repeat_last_n < 0 else list(history)[len(history) - min(repeat_last_n, len(history)):]
    for tok in set(window):
        count = window.count(tok)
        z[tok] = z[tok] / f32(repetition_penalty) if z[tok] > 0 else z[tok] * f32(repetition_penalty)
        z[tok] = z[tok] - (f32(presence_penalty) + f32(frequency_penalty) * f32(count))
    for tok, b in logit_bias:
        z[tok] += f32(b)
    probs = np.zeros(len(z))
    if temperature == 0:
        probs[int(np.argmax(z))] = 1.0
        return probs, np.inf
    scaled = (z / f32(temperature)).astype(f32)
    order = np.argsort(-scaled, kind="stable")
    n = len(order) if top_k == 0 else min(top_k, len(order))
    order = order[:n]
    w = np.exp(scaled[order].astype(np.float64) - float(scaled[order[0]]))
    p = w / w.sum()
    margin = np.inf
    if top_p < 1.0:
        cum = np.cumsum(p)
        keep = int(np.searchsorted(cum, np.float64(f32(top_p)), side="left")) + 1
        margin = float(np.min(np.abs(cum - np.float64(f32(top_p)))))
        order, p = order[:keep], p[:keep]
    if min_p > 0.0:
        floor = np.float64(f32(min_p)) * p[0]
        margin = min(margin, float(np.min(np.abs(p - floor))))
        keep = max(1, int(np.sum(p >= floor)))
        order, p = order[:keep], p[:keep]
    p = p / p.sum()
    if typical_p < 1.0 and len(p) > 1:
        entropy = -np.sum(p * np.log(p))
        dev = np.abs(-np.log(p) - entropy)
        by_dev = np.argsort(dev, kind="stable")
        cum = np.cumsum(p[by_dev])
        keep = int(np.searchsorted(cum, np.float64(f32(typical_p)), side="left")) + 1
        margin = min(margin, float(np.min(np.abs(cum - np.float64(f32(typical_p))))))
        sorted_dev = np.sort(dev)
        if len(sorted_dev) > 1:
            margin = min(margin, float(np.min(np.diff(sorted_dev))))
        chosen = np.sort(by_dev[:keep])
        order, p = order[chosen], p[chosen] / p[chosen].sum()
    probs[order] = p
    return probs, margin


def native_distribution(logits, history=(), **kw):
    sampler = _core.Sampler(make_params(seed=1, **kw), len(logits))
    sampler.sample(np.asarray(logits, np.float32), np.asarray(history, np.int32))
    probs = np.zeros(len(logits))
    for tok, pr in sampler.last_candidates():
        probs[tok] = pr
    return probs


logits_strategy = st.lists(st.floats(-8, 8, allow_nan=False, width=32), min_size=2, max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    logits=logits_strategy,
    temperature=st.floats(0.1, 3.0),
    top_k=st.integers(0, 45),
    top_p=st.floats(0.05, 1.0),
    min_p=st.floats(0.0, 0.5),
    typical_p=st.sampled_from([1.0, 0.9, 0.5, 0.2]),
)
def test_filtered_distribution_is_exact(logits, temperature, top_k, top_p, min_p, typical_p):
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p)
    ref, margin = reference(logits, **kw)
    assume(margin > 1e-6)   # exactly on a threshold, either side is right
    np.testing.assert_allclose(native_distribution(logits, **kw), ref, atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(
    logits=logits_strategy,
    history=st.lists(st.integers(0, 1), min_size=0, max_size=30),
    repetition_penalty=st.floats(0.5, 2.0),
    presence_penalty=st.floats(-1.0, 1.0),
    frequency_penalty=st.floats(-0.5, 0.5),
    repeat_last_n=st.sampled_from([-1, 0, 3, 64]),
)
def test_penalties_match_reference(logits, history, repetition_penalty, presence_penalty, frequency_penalty,
                                   repeat_last_n):
    kw = dict(repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
              frequency_penalty=frequency_penalty, repeat_last_n=repeat_last_n)
    ref, _ = reference(logits, history, **kw)
    np.testing.assert_allclose(native_distribution(logits, history, **kw), ref, atol=1e-6)
    # greedy applies the penalties too and then takes the argmax
    greedy, _ = reference(logits, history, temperature=0.0, **kw)
    sampler = _core.Sampler(make_params(temperature=0.0, **kw), len(logits))
    assert sampler.sample(np.asarray(logits, np.float32), np.asarray(history, np.int32)) == int(np.argmax(greedy))


def test_greedy_is_argmax_with_first_index_on_ties():
    logits = np.array([1.0, 5.0, 2.0, 5.0], np.float32)
    sampler = _core.Sampler(make_params(temperature=0.0), 4)
    assert sampler.sample(logits, np.zeros(0, np.int32)) == 1


@pytest.mark.parametrize("n", [1, 3, 4, 5, 15, 16, 17, 49152, 49155])
def test_greedy_over_vocabulary_sizes_takes_the_first_maximum(n):
    # the vectorized passes work four and sixteen values at a time; ties and tails must still
    # give numpy's first maximum
    rng = np.random.default_rng(n)
    sampler = _core.Sampler(make_params(temperature=0.0), n)
    for _ in range(20):
        logits = rng.integers(-4, 4, n).astype(np.float32)
        assert sampler.sample(logits, np.zeros(0, np.int32)) == int(np.argmax(logits))
    logits = np.zeros(n, np.float32)
    logits[-1] = 1.0
    assert sampler.sample(logits, np.zeros(0, np.int32)) == n - 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("at", [0, 6, 49154])
def test_a_non_finite_logit_is_named_wherever_it_is(bad, at):
    logits = np.zeros(49155, np.float32)
    logits[at] = bad
    with pytest.raises(tokenmill.errors.NumericalError, match=f"logit {at} is"):
        _core.Sampler(make_params(temperature=0.0), logits.size).sample(logits, np.zeros(0, np.int32))


def test_logit_bias_can_ban_and_force():
    logits = np.zeros(6, np.float32)
    sampler = _core.Sampler(make_params(temperature=0.0, logit_bias=[(4, 10.0)]), 6)
    assert sampler.sample(logits, np.zeros(0, np.int32)) == 4
    sampler = _core.Sampler(make_params(temperature=1.0, logit_bias=[(t, -np.inf) for t in range(5)], seed=3), 6)
    assert {sampler.sample(logits, np.zeros(0, np.int32)) for _ in range(50)} == {5}


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=6),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=1.0, min_p=0.1),
        dict(temperature=0.9, top_k=8, top_p=0.9, min_p=0.02, typical_p=0.8),
    ],
)
def test_sampling_frequencies_follow_the_distribution(kw):
    logits = np.random.default_rng(42).normal(0, 1.5, size=12).astype(np.float32)
    ref, _ = reference(logits, **kw)
    sampler = _core.Sampler(make_params(seed=2024, **kw), len(logits))
    draws = 20000
    counts = np.bincount([sampler.sample(logits, np.zeros(0, np.int32)) for _ in range(draws)], minlength=12)
    support = ref > 0
    assert counts[~support].sum() == 0
    chi2, pvalue = stats.chisquare(counts[support], ref[support] * draws)
    assert pvalue > 1e-3, (chi2, pvalue)


def test_seeded_streams_are_reproducible_and_independent():
    logits = np.random.default_rng(0).normal(size=50).astype(np.float32)
    history = np.zeros(0, np.int32)

    def draws(seed, n=64):
        s = _core.Sampler(make_params(seed=seed), 50)
        return [s.sample(logits, history) for _ in range(n)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    # interleaving two samplers does not change either stream
    a, b = _core.Sampler(make_params(seed=7), 50), _core.Sampler(make_params(seed=8), 50)
    inter = [(a.sample(logits, history), b.sample(logits, history)) for _ in range(64)]
    assert [x for x, _ in inter] == draws(7) and [y for _, y in inter] == draws(8)


def _xoshiro_uniforms(seed, n):
    """Python reference of the documented generator: splitmix64 seeding, xoshiro256**, 53-bit floats."""
    mask = 2**64 - 1
    state = []
    for _ in range(4):
        seed = (seed + 0x9E3779B97F4A7C15) & mask
        z = seed
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        state.append(z ^ (z >> 31))
    rotl = lambda x, k: ((x << k) | (x >> (64 - k))) & mask
    out = []
    for _ in range(n):
        s0, s1, s2, s3 = state
        result = (rotl((s1 * 5) & mask, 7) * 9) & mask
        t = (s1 << 17) & mask
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        s3 = rotl(s3, 45)
        state = [s0, s1, s2, s3]
        out.append((result >> 11) * 2.0**-53)
    return out


def test_draws_follow_the_documented_generator():
    """With a uniform distribution over 1000 tokens, draw i is floor(u_i * 1000) for the i-th
    uniform of xoshiro256** seeded by splitmix64: the same on every machine."""
    logits = np.zeros(1000, np.float32)
    s = _core.Sampler(make_params(seed=12345), 1000)
    draws = [s.sample(logits, np.zeros(0, np.int32)) for _ in range(200)]
    expected = [int(u * 1000) for u in _xoshiro_uniforms(12345, 200)]
    assert draws == expected


@pytest.mark.parametrize("bad,match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(min_p=2.0), "min_p"), (dict(typical_p=0.0), "typical_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repeat_last_n=-5), "repeat_last_n"), (dict(logit_bias=[(99, 1.0)]), "logit_bias"),
])
def test_native_validation_names_the_parameter(bad, match):
    with pytest.raises(tokenmill.InvalidArgumentError, match=match):
        _core.Sampler(make_params(**bad), 10)
