"""The forward pass's seams, checked against transformers on the same weights: an extension adding a
low-rank product after a projection equals the model with W + s·B·A (per sequence, by adapter slot,
in one batch); an extension adding to the residual stream after a layer equals a forward hook there;
per-layer residual rows equal transformers' hidden_states; output rows are any rows. Also: a cache
that grows on demand computes exactly what a fully allocated one does."""

import copy

import numpy as np
import pytest
import torch

import tokenmill
from tokenmill import _testing
from conftest import rel_err

RNG = np.random.default_rng(11)
IDS = RNG.integers(0, 320, size=24).tolist()

HF_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def _hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


def _low_rank(hf_model, layer, proj, rank=4, scale=0.5, seed=0):
    """(a [r, in], b [out, r], scale) and a copy of hf_model whose weight is W + scale * b @ a."""
    lin = hf_model.model.layers[layer].get_submodule(HF_PROJ[proj])
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((rank, lin.in_features)) * 0.2).astype(np.float32)
    b = (rng.standard_normal((lin.out_features, rank)) * 0.2).astype(np.float32)
    merged = copy.deepcopy(hf_model)
    with torch.no_grad():
        target = merged.model.layers[layer].get_submodule(HF_PROJ[proj])
        target.weight += torch.from_numpy(scale * b @ a)
    return a, b, scale, merged


@pytest.fixture(scope="module")
def llama(tiny_models):
    directory, hf_model = tiny_models["llama"]
    return tokenmill.load(directory), hf_model


@pytest.mark.parametrize("layer,proj", [(0, "q"), (1, "k"), (2, "v"), (1, "o"), (0, "gate"), (2, "up"), (1, "down")])
def test_low_rank_addition_after_a_projection_equals_merged_weights(llama, layer, proj):
    model, hf_model = llama
    a, b, scale, merged = _low_rank(hf_model, layer, proj)
    ext = _testing.LowRankAdd(model.native, layer, proj, a, b, scale)
    base = model.logits(IDS)
    model.add_extension(ext)
    try:
        got = model.logits(IDS)
        cache = model.new_cache(len(IDS))
        model.eval(cache, IDS[:10], logits=None)
        decoded = [model.eval(cache, [t]).logits[0] for t in IDS[10:]]
    finally:
        model.remove_extension(ext)
    ref = _hf_logits(merged, IDS)
    assert rel_err(got, ref) < 1e-4
    assert rel_err(np.stack(decoded), ref[10:]) < 1e-4           # one token at a time through the cache
    assert rel_err(base, ref) > 1e-3                             # the addition mattered
    np.testing.assert_array_equal(model.logits(IDS), base)       # and is gone once removed


def test_adapter_slots_apply_per_sequence_in_one_batch(llama):
    model, hf_model = llama
    a, b, scale, merged = _low_rank(hf_model, 1, "v", seed=3)
    ext = _testing.LowRankAdd(model.native, 1, "v", a, b, scale, slot=1)
    seqs = [IDS[:9], IDS[:17], IDS[3:14]]
    model.add_extension(ext)
    try:
        caches = [model.new_cache(32) for _ in seqs]
        out = model.eval_batch(caches, seqs, "last", adapters=[-1, 1, 0]).logits
    finally:
        model.remove_extension(ext)
    assert rel_err(out[0], _hf_logits(hf_model, seqs[0])[-1]) < 1e-4   # no adapter: the base model
    assert rel_err(out[1], _hf_logits(merged, seqs[1])[-1]) < 1e-4     # slot 1: the adapted model
    assert rel_err(out[2], _hf_logits(hf_model, seqs[2])[-1]) < 1e-4   # another slot: not this adapter


def test_module_after_a_layer_equals_a_forward_hook(llama):
    model, hf_model = llama
    v = (RNG.standard_normal(64) * 0.3).astype(np.float32)
    hook = hf_model.model.layers[1].register_forward_hook(
        lambda mod, inp, out: (out[0] + torch.from_numpy(v),) + tuple(out[1:]) if isinstance(out, tuple)
        else out + torch.from_numpy(v))
    try:
        ref = _hf_logits(hf_model, IDS)
    finally:
        hook.remove()
    ext = _testing.AddAfterLayer(model.native, 1, v)
    model.add_extension(ext)
    try:
        got = model.logits(IDS)
        with pytest.raises(tokenmill.InvalidArgumentError, match="already registered"):
            model.add_extension(ext)
    finally:
        model.remove_extension(ext)
    assert rel_err(got, ref) < 1e-4
    with pytest.raises(tokenmill.InvalidArgumentError, match="not registered"):
        model.remove_extension(ext)


def test_layer_rows_are_transformers_hidden_states(llama):
    model, hf_model = llama
    with torch.no_grad():
        hidden = [h[0].numpy() for h in hf_model(torch.tensor([IDS]), output_hidden_states=True).hidden_states]
    n_layer = model.n_layer
    out = model.eval(model.new_cache(len(IDS)), IDS, logits=None, hidden="all",
                     layers={layer: "all" for layer in range(n_layer + 1)})
    for layer in range(n_layer):   # the input of decoder layer `layer`
        assert rel_err(out.layers[layer], hidden[layer]) < 1e-5, layer
    assert rel_err(out.hidden, hidden[n_layer]) < 1e-5   # HF's last entry is after the final norm
    final_norm = hf_model.model.norm
    with torch.no_grad():
        normed = final_norm(torch.from_numpy(out.layers[n_layer])).numpy()
    assert rel_err(normed, hidden[n_layer]) < 1e-5       # layer n_layer: before that norm


def test_output_rows_are_any_rows_in_any_order(llama):
    model, _ = llama
    full = model.logits(IDS)
    all_hidden = model.eval(model.new_cache(len(IDS)), IDS, logits=None, hidden="all").hidden
    out = model.eval(model.new_cache(len(IDS)), IDS, logits=[5, 0, 5, 23], hidden=[2], layers={1: [7, 7]})
    np.testing.assert_allclose(out.logits, full[[5, 0, 5, 23]], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.hidden, all_hidden[[2]], rtol=0, atol=1e-6)
    assert out.layers[1].shape == (2, 64) and np.array_equal(out.layers[1][0], out.layers[1][1])
    nothing = model.eval(model.new_cache(len(IDS)), IDS, logits=None)
    assert nothing.logits is None and nothing.hidden is None and nothing.layers == {}
    rows = model.eval_batch([model.new_cache(8), model.new_cache(8)], [IDS[:3], IDS[:5]], logits=[2, 7]).logits
    np.testing.assert_allclose(rows, [model.logits(IDS[:3])[2], model.logits(IDS[:5])[4]], rtol=0, atol=1e-5)


def test_a_growing_cache_computes_what_a_full_one_does(llama):
    model, _ = llama
    ids = RNG.integers(0, 320, size=200).tolist()
    full = model.new_cache(256)
    grow = model.new_cache(256, reserve=0)
    assert full.allocated == 256 and grow.allocated == 0 and grow.bytes < full.bytes
    a = [model.eval(full, ids[:10], "all").logits]
    b = [model.eval(grow, ids[:10], "all").logits]
    assert grow.allocated == 64
    for t in range(10, 200, 30):
        a.append(model.eval(full, ids[t : t + 30], "all").logits)
        b.append(model.eval(grow, ids[t : t + 30], "all").logits)
    assert grow.allocated == 256 and grow.n_past == 200
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))


def test_quantized_growing_cache_with_ring_equals_a_full_one(smollm):
    ids = smollm.tokenize("The quick brown fox jumps over the lazy dog. " * 12)[:120]
    spec = tokenmill.CacheSpec("q4", "q8", residual_len=8)
    full, grow = smollm.new_cache(128, spec), smollm.new_cache(128, spec, reserve=0)
    outs = []
    for cache in (full, grow):
        smollm.eval(cache, ids[:60], logits=None)
        outs.append(np.stack([smollm.eval(cache, [t]).logits[0] for t in ids[60:]]))
    assert grow.allocated == 128
    np.testing.assert_array_equal(outs[0], outs[1])
