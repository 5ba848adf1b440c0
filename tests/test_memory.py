"""Memory-augmented models against a PyTorch reference of the memory math (tests/memory_util.py) on tiny
random Llama and Qwen2 bases: every routing strategy, full and low-rank projections, chaptered banks
with and without shared chapters, shared and per-layer banks; prompt then token-by-token decode."""

from __future__ import annotations

import numpy as np
import pytest

import tokenmill
from tokenmill import GenerateConfig, Generator
from tokenmill.errors import ConfigError, InvalidArgumentError, ModelFileError, ModelFormatError, UnsupportedModelError

from memory_util import MemoryReference, random_memory, write_checkpoint

STRATEGIES = ("sequence", "rolling", "token", "hybrid")

CHAPTERED = dict(num_memory_tokens=32, memory_layer_placement="custom", memory_layer_indices=[0, 2],
                 memory_sharing="shared", use_chapters=True, num_chapters=8, top_k_chapters=2,
                 num_shared_chapters=0, routing_strategy_inference="sequence", routing_window_size=4)
LOW_RANK_SHARED = dict(num_memory_tokens=48, memory_layer_placement="all", memory_sharing="per_layer",
                       use_low_rank_memory=True, memory_rank=8, low_rank_mode="factorized",
                       use_low_rank_projections=True, projection_rank=6, use_chapters=True, num_chapters=6,
                       top_k_chapters=2, num_shared_chapters=2, routed_scaling_factor=0.7,
                       normalize_shared_routed_before_mixing=True, shared_routed_norm_type="rms",
                       routing_strategy_inference="hybrid", routing_window_size=3)
PLAIN = dict(num_memory_tokens=20, memory_layer_placement="every_n", memory_layer_n=2, memory_sharing="every_k_layers",
             memory_sharing_k=1, use_chapters=False, memory_num_heads=2, memory_num_kv_heads=1)

CASES = {"llama-chaptered": ("llama", CHAPTERED), "qwen2-lowrank-shared": ("qwen2", LOW_RANK_SHARED),
         "llama-plain": ("llama", PLAIN)}


@pytest.fixture(scope="module")
def memory_models(tiny_models, tmp_path_factory):
    """case -> (tokenmill model with memory, the HF model, memory section, tensors)."""
    out = {}
    for case, (arch, memory) in CASES.items():
        d, hf = tiny_models[arch]
        tensors = random_memory(hf.config, memory, seed=len(case))
        # the trainer saves the frozen base beside the memory, under a wrapper prefix: both are ignored
        ckpt = write_checkpoint(tmp_path_factory.mktemp(f"mem-{case}"), hf.config, memory,
                                {"model." + k: v for k, v in tensors.items()},
                                {"base_model.model.embed_tokens.weight": np.zeros((4, 4), np.float32)})
        out[case] = (tokenmill.load(d, memory=ckpt), hf, memory, tensors, ckpt)
    return out


def _decode_logits(model, ids, prompt_len):
    """tokenmill: the prompt in one pass, then one token per pass; logits of every position."""
    cache = model.new_cache()
    rows = [model.eval(cache, ids[:prompt_len], logits="all").logits]
    for t in ids[prompt_len:]:
        rows.append(model.eval(cache, [t]).logits)
    return np.concatenate(rows).astype(np.float64), cache


IDS = [5, 17, 99, 3, 250, 42, 8, 77, 19, 140, 64, 2, 31, 300, 12, 9]


@pytest.mark.parametrize("case, strategy", [(c, s) for c, (_, m) in CASES.items()
                                             for s in (STRATEGIES if m.get("use_chapters") else ("sequence",))])
def test_logits_match_reference(memory_models, case, strategy):
    model, hf, memory, tensors, _ = memory_models[case]
    model.set_routing(strategy)
    ref = MemoryReference(hf, memory, tensors, strategy, model.memory.top_k, model.memory.window_size)
    want = ref.logits(IDS, prompt_len=9)
    got, _ = _decode_logits(model, IDS, 9)
    base = np.asarray(hf(__import__("torch").tensor([IDS])).logits[0].detach(), np.float64)
    assert np.abs(want - base).max() > 0.05, "the memory must change the logits for the test to mean anything"
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("case", ["llama-chaptered", "qwen2-lowrank-shared"])
def test_greedy_continuation_matches_reference(memory_models, case):
    model, hf, memory, tensors, _ = memory_models[case]
    for strategy in ("hybrid", "token"):
        model.set_routing(strategy)
        ref = MemoryReference(hf, memory, tensors, strategy, model.memory.top_k, model.memory.window_size)
        prompt = IDS[:7]
        got = Generator(model, GenerateConfig(temperature=0, max_new_tokens=10, ignore_eos=True)).generate(prompt)
        assert list(got) == ref.greedy(prompt, 10)


def test_batch_of_mixed_lengths_equals_one_by_one(memory_models):
    model, *_ = memory_models["qwen2-lowrank-shared"]
    prompts = [IDS[:3], IDS[2:11], IDS[5:6], IDS[:14]]
    for strategy in ("hybrid", "token", "sequence"):
        model.set_routing(strategy)
        alone = []
        for p in prompts:
            got, _ = _decode_logits(model, p + [7, 8, 9], len(p))
            alone.append(got[len(p) - 1:])
        caches = [model.new_cache() for _ in prompts]
        out = model.eval_batch(caches, prompts).logits
        steps = [out]
        for t in (7, 8, 9):
            steps.append(model.eval_batch(caches, [[t]] * len(prompts)).logits)
        for i in range(len(prompts)):
            batched = np.stack([s[i] for s in steps])
            assert np.abs(batched - alone[i]).max() < 1e-4


def test_rollback_and_speculative_verification_keep_routing(memory_models):
    model, hf, memory, tensors, _ = memory_models["llama-chaptered"]
    model.set_routing("rolling", window_size=3)
    want, cache = _decode_logits(model, IDS, 6)
    cache.truncate(10)   # rollback: the routing history goes with the positions
    again = model.eval(cache, IDS[10:], logits="all").logits
    assert np.abs(again - want[10:]).max() < 1e-5
    cache.truncate(10)   # several tokens in one exact pass route as if decoded one by one
    exact = model.eval(cache, IDS[10:], logits="all", decode_exact=True).logits
    assert np.abs(exact - want[10:]).max() < 1e-5
    model.set_routing("sequence", window_size=4)


def test_scheduler_batches_match_single_generation(memory_models):
    model, *_ = memory_models["llama-chaptered"]
    model.set_routing("hybrid")
    prompts = [IDS[:4], IDS[3:12], IDS[1:9]]
    cfg = GenerateConfig(temperature=0, max_new_tokens=6, ignore_eos=True)
    alone = [list(Generator(model, cfg).generate(p)) for p in prompts]
    batched = model.generate_batch(prompts, details=True, configs=[cfg] * 3)
    assert [list(r.token_ids) for r in batched] == alone
    model.set_routing("sequence")


def test_quantized_memory_stays_close(memory_models, tiny_models):
    """int8 / int4 keys and values (a scale per row): their error measured against the memory's own
    effect on the logits (with memory minus without). A bank without chapters, so that no routing
    decision near a tie can flip and the figure is the quantization's alone."""
    model, *_ = memory_models["llama-plain"]
    exact, _ = _decode_logits(model, IDS, 9)
    effect = np.abs(exact - _decode_logits(tokenmill.load(tiny_models["llama"][0]), IDS, 9)[0]).max()
    f32_bytes = model.memory.table_bytes
    errors = {}
    for quant in ("int8", "int4"):
        model.memory.set_quant(quant)
        got, _ = _decode_logits(model, IDS, 9)
        errors[quant] = np.abs(got - exact).max() / effect
        assert model.memory.table_bytes < f32_bytes / (3 if quant == "int8" else 5)
    model.memory.set_quant("f32")
    assert 0 < errors["int8"] < 2.5e-2 and errors["int8"] < errors["int4"] < 0.4, errors


def test_python_routers_choose_what_the_core_chose(memory_models):
    import torch

    model, hf, memory, tensors, _ = memory_models["llama-chaptered"]
    with torch.no_grad():
        after_layer0 = hf(torch.tensor([IDS]), output_hidden_states=True).hidden_states[1][0].double().numpy()
    router = tokenmill.memory.ChapterRouter.from_model(model, 0)
    for strategy in ("sequence", "token", "rolling", "hybrid"):
        model.set_routing(strategy, window_size=4)
        cache = model.new_cache()
        model.eval(cache, IDS[:9])
        inference = tokenmill.memory.create_inference_router(router, strategy, top_k=2, window_size=4)
        idx, w = inference.route(after_layer0[:9])
        got = model.memory.last_route(cache, 0)
        if strategy == "token":
            idx, w = idx[:, -1], w[:, -1]
        assert [c for c, _ in got] == list(idx[0]) and np.allclose([x for _, x in got], w[0], atol=1e-5)
    model.set_routing("sequence", window_size=4)


def test_checkpoint_round_trips_and_gguf_export(memory_models, tmp_path, tiny_models):
    model, hf, memory, tensors, _ = memory_models["qwen2-lowrank-shared"]
    model.set_routing("hybrid")
    want, _ = _decode_logits(model, IDS, 9)
    saved = tokenmill.memory.extract_memory_weights(model, tmp_path / "extracted")
    assert set(saved) == set(tensors)
    again = tokenmill.load(tiny_models["qwen2"][0], memory=tmp_path / "extracted")
    assert np.abs(_decode_logits(again, IDS, 9)[0] - want).max() < 1e-5

    gguf_path = tokenmill.memory.export_to_gguf(model, tmp_path / "with-memory.gguf", "f32")
    import gguf
    names = {t.name for t in gguf.GGUFReader(str(gguf_path)).tensors}
    assert "token_embd.weight" in names and "routers.1.router.weight" in names
    from_gguf = tokenmill.load(gguf_path)   # the memory comes with the file
    assert from_gguf.memory is not None and from_gguf.memory.strategy == "hybrid"
    assert np.abs(_decode_logits(from_gguf, IDS, 9)[0] - want).max() < 1e-4

    tokenmill.memory.quantize_memory_for_deployment(again, bits=8, output_path=tmp_path / "deployed")
    quantized, _ = _decode_logits(again, IDS, 9)
    deployed = tokenmill.load(tiny_models["qwen2"][0], memory=tmp_path / "deployed")
    assert deployed.memory.quant == "int8" and deployed.memory.table_bytes == again.memory.table_bytes
    got = _decode_logits(deployed, IDS, 9)[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-2
    assert np.abs(got - quantized).max() / np.abs(want).max() < 1e-2


def _broken(tmp_path, tiny_models, change, memory=CHAPTERED):
    hf = tiny_models["llama"][1]
    tensors = random_memory(hf.config, memory, seed=3)
    memory = dict(memory)
    change(tensors, memory)
    return write_checkpoint(tmp_path / "broken", hf.config, memory, tensors)


@pytest.mark.parametrize("change, error, words", [
    (lambda t, m: t.pop("memory_adapters.2.memory_attn.k_proj.weight"), ModelFormatError, "memory_adapters.2.memory_attn.k_proj"),
    (lambda t, m: t.update({"routers.0.router.weight": np.zeros((7, 64), np.float32)}), ModelFormatError,
     "routers.0.router.weight"),
    (lambda t, m: t.pop("memory_banks.0.base_bank.memory"), ModelFormatError, "bank 0"),
    (lambda t, m: m.update(routing_strategy_inference="sequence-rolling"), UnsupportedModelError, "sequence-rolling"),
    (lambda t, m: m.update(memory_dim=32), UnsupportedModelError, "memory_dim"),
    (lambda t, m: m.update(memory_layer_placement="middle"), ConfigError, "middle"),
    (lambda t, m: m.update(memory_layer_indices=[0, 9]), ConfigError, "[9]"),
    (lambda t, m: m.update(num_chapters=5), ConfigError, "chapters"),
    (lambda t, m: t.update({"memory_adapters.0.memory_attn.q_proj.lora_A.weight": np.zeros((2, 64), np.float32)}),
     UnsupportedModelError, "LoRA"),
])
def test_bad_checkpoints_name_what_is_wrong(tmp_path, tiny_models, change, error, words):
    ckpt = _broken(tmp_path, tiny_models, change)
    with pytest.raises(error, match=__import__("re").escape(words)):
        tokenmill.load(tiny_models["llama"][0], memory=ckpt)


def test_checkpoint_files_are_checked(tmp_path, tiny_models):
    base = tiny_models["llama"][0]
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "config.yaml").write_text("memory: {num_memory_tokens: 8}")
    (tmp_path / "pt" / "model.pt").write_bytes(b"\x80\x04not read")
    with pytest.raises(ModelFileError, match="pickle"):
        tokenmill.load(base, memory=tmp_path / "pt")
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "config.yaml").write_text("memory: [unclosed")
    (tmp_path / "yaml" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError):
        tokenmill.load(base, memory=tmp_path / "yaml")
    with pytest.raises(ModelFileError):
        tokenmill.load(base, memory=tmp_path / "missing")


def test_routing_arguments_are_checked(memory_models):
    model, *_ = memory_models["llama-chaptered"]
    with pytest.raises(InvalidArgumentError, match="routing strategy"):
        model.set_routing("random")
    with pytest.raises(InvalidArgumentError, match="top_k"):
        model.set_routing("token", top_k=9)
    with pytest.raises(InvalidArgumentError, match="window_size"):
        model.set_routing("rolling", window_size=0)
    with pytest.raises(InvalidArgumentError, match="already has memory"):
        model.attach_memory(memory_models["llama-chaptered"][4])
    assert model.memory.strategy == "sequence"


def test_adopted_prefix_without_routing_state_is_refused(memory_models):
    model, *_ = memory_models["llama-chaptered"]
    pool = model.new_pool(8, block_size=4)
    first = model.new_paged_cache(pool)
    model.eval(first, IDS[:8])
    second = model.new_paged_cache(pool)
    second.adopt(first.block_table[:1], 4)
    with pytest.raises(InvalidArgumentError, match="routing state"):
        model.eval(second, IDS[4:8])
    assert second.n_past == 4


@pytest.fixture(scope="module")
def smol_memory(default_gguf, tmp_path_factory):
    """SmolLM2 with random memory after 2 layers, and its checkpoint directory."""
    from types import SimpleNamespace

    hp = tokenmill.load(default_gguf).hparams
    cfg = SimpleNamespace(hidden_size=hp.n_embd, num_hidden_layers=hp.n_layer, num_attention_heads=hp.n_head,
                          num_key_value_heads=hp.n_head_kv)
    section = dict(CHAPTERED, num_memory_tokens=64, memory_layer_indices=[3, 20], routing_strategy_inference="hybrid")
    ckpt = write_checkpoint(tmp_path_factory.mktemp("smol"), cfg, section, random_memory(cfg, section, seed=1))
    return tokenmill.load(default_gguf, memory=ckpt), ckpt


def test_seed_generate_api_on_the_default_model(smol_memory, smollm):
    """tokenmill.memory.generate / generate_batch on SmolLM2 with random memory after 2 layers."""
    model, _ = smol_memory
    base = smollm
    prompt = "The capital of France is"
    greedy = tokenmill.memory.generate(model, None, prompt, max_new_tokens=8, do_sample=False)
    assert greedy == model.generate(prompt, max_new_tokens=8, temperature=0, top_k=0, top_p=1.0, min_p=0.0)
    assert greedy != base.generate(prompt, max_new_tokens=8, temperature=0)   # the memory is really there
    prompts = [prompt, "Water boils at", "One, two,"]
    batch = tokenmill.memory.generate_batch(model, None, prompts, max_new_tokens=8, do_sample=False)
    assert batch[0] == greedy
    assert batch == [tokenmill.memory.generate(model, None, p, max_new_tokens=8, do_sample=False) for p in prompts]
    token = tokenmill.memory.generate(model, None, prompt, max_new_tokens=8, do_sample=False, routing="token")
    assert model.memory.strategy == "hybrid" and isinstance(token, str)
    router = tokenmill.memory.RollingWindowRouter(tokenmill.memory.ChapterRouter.from_model(model, 3), top_k=1, window_size=8)
    tokenmill.memory.generate(model, None, prompt, max_new_tokens=4, router=router)
    assert (model.memory.strategy, model.memory.top_k) == ("hybrid", 2)
    sampled = [tokenmill.memory.generate(model, None, prompt, max_new_tokens=8, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]
    with pytest.raises(InvalidArgumentError, match="cuda"):
        tokenmill.memory.generate(model, None, prompt, device="cuda")


def test_speculative_lookup_keeps_greedy_output(memory_models):
    from tokenmill import SpeculativeConfig, SpeculativeGenerator

    model, *_ = memory_models["qwen2-lowrank-shared"]
    prompt = IDS[:6] * 3   # repeats, so prompt lookup drafts something
    for strategy in ("hybrid", "token", "rolling"):
        model.set_routing(strategy)
        plain = Generator(model, GenerateConfig(temperature=0, max_new_tokens=12, ignore_eos=True)).generate(prompt)
        spec = SpeculativeGenerator(model, "lookup", SpeculativeConfig(temperature=0, max_new_tokens=12, ignore_eos=True,
                                                                     spec_k=4))
        assert list(spec.generate(prompt)) == list(plain)
    model.set_routing("hybrid")


def test_cli_generate_with_memory(smol_memory, default_gguf, capsys):
    from tokenmill.tools.cli import main

    model, ckpt = smol_memory
    rc = main(["generate", "--model", str(default_gguf), "--memory", str(ckpt), "--routing", "token", "--temp", "0",
               "--num-tokens", "8", "--prompt", "The capital of France is"])
    assert rc in (0, None)
    want = tokenmill.memory.generate(model, None, "The capital of France is", max_new_tokens=8, do_sample=False,
                                     routing="token")
    assert capsys.readouterr().out.strip() == want.strip()
