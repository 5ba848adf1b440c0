"""tokenmill vs HF transformers on tiny random models saved as HF safetensors directories."""

import copy

import numpy as np
import pytest
import torch
import transformers

import tokenmill
from conftest import TINY, rel_err

ARCHS = ["gpt2", "llama", "qwen2", "mistral"]


def _prompt(n=64, vocab=320, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, size=n).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_transformers(tiny_models, arch):
    directory, hf_model = tiny_models[arch]
    ids = _prompt()
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    ours = tokenmill.load(directory).logits(ids)
    assert ours.shape == ref.shape == (64, 320)
    assert rel_err(ours, ref) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_kv_cache_matches_transformers(tiny_models, arch):
    directory, hf_model = tiny_models[arch]
    ids = _prompt(seed=2)
    with torch.no_grad():
        ref = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0
        )[0, len(ids):].tolist()
    model = tokenmill.load(directory)
    ours = tokenmill.generate(model, ids, max_new_tokens=32, temperature=0, ignore_eos=True)
    assert ours == ref


def test_decode_steps_equal_prefill(tiny_models):
    """Logits of a token fed one at a time through the cache equal the full-prefill logits."""
    directory, _ = tiny_models["llama"]
    model = tokenmill.load(directory)
    ids = _prompt(n=40, seed=3)
    full = model.logits(ids)
    cache = model.new_cache(40)
    model.eval(cache, ids[:30], logits=None)
    steps = [model.eval(cache, [t]).logits[0] for t in ids[30:]]
    assert rel_err(np.stack(steps), full[30:]) < 1e-5


def test_batch_of_sequences_equals_each_alone(tiny_models):
    directory, _ = tiny_models["qwen2"]
    model = tokenmill.load(directory)
    seqs = [_prompt(n=n, seed=n) for n in (5, 17, 9)]
    alone = [model.logits(s)[-1] for s in seqs]
    caches = [model.new_cache(32) for _ in seqs]
    batched = model.eval_batch(caches, seqs).logits
    for a, b in zip(alone, batched):
        assert rel_err(b, a) < 1e-5


def test_hidden_states_match_transformers(tiny_models):
    directory, hf_model = tiny_models["llama"]
    ids = _prompt(n=16, seed=4)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].numpy()
    model = tokenmill.load(directory)
    hidden = model.eval(model.new_cache(16), ids, logits=None, hidden="all").hidden
    assert rel_err(hidden, ref) < 1e-4


def test_prefill_from_embeddings_equals_prefill_from_ids(tiny_models):
    directory, hf_model = tiny_models["llama"]
    ids = _prompt(n=12, seed=5)
    embeds = hf_model.get_input_embeddings().weight.detach().numpy()[ids]
    model = tokenmill.load(directory)
    from_ids = model.logits(ids)
    from_embeds = model.eval(model.new_cache(12), embeds.astype(np.float32), "all").logits
    assert rel_err(from_embeds, from_ids) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sharded_half_precision_safetensors(tiny_models, tmp_path, dtype):
    """F16 / BF16 weights in several shards (model.safetensors.index.json), used in place; the
    reference is transformers computing in float32 from the same rounded weights."""
    _, hf_model = tiny_models["qwen2"]
    copy.deepcopy(hf_model).to(dtype).save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    reference = type(hf_model).from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = _prompt(n=32, seed=9)
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0].numpy()
    assert rel_err(tokenmill.load(tmp_path).logits(ids), ref) < 1e-4


def test_heads_narrower_than_the_embedding(tmp_path):
    """n_head * head_dim < hidden_size (an explicit head_dim): every buffer sized by the right one."""
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                 initializer_range=0.08, **TINY)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ids = _prompt(n=40, seed=11)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    model = tokenmill.load(tmp_path)
    assert rel_err(model.logits(ids), ref) < 1e-4
    assert tokenmill.generate(model, ids, max_new_tokens=8, temperature=0, ignore_eos=True) == \
        hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 40:].tolist()
