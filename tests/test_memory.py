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


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_logits_match_reference(memory_models, case, strategy):
    model, hf, memory, tensors, _ = memory_models[case]
    if not memory.get("use_chapters") and strategy != "sequence":
        pytest.skip("a bank without chapters has no routing")
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
