"""The GPU backends (cuda/, and hip/ from the same sources) against the CPU backend: every op on the
same inputs by normalised mean squared error (ggml's test-backend-ops measure), attention over every
cache kind, and whole models (logits, 32 greedy tokens, batches, adapters, memory layers). Without a
GPU build or without a device the device tests skip; the harness itself is checked on the CPU
against numpy, and the shared block arithmetic against numpy and torch, everywhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokenmill
from tokenmill import _core, _testing
from tokenmill.errors import InvalidArgumentError, UnsupportedModelError

from memory_util import random_memory, write_checkpoint
from test_memory import CHAPTERED


def _present(device: str) -> bool:
    try:
        _testing.backend_op(device, "scale", np.ones((1, 4), np.float32), value=2.0)
        return True
    except UnsupportedModelError:   # built, but no device here
        return False


GPUS = [d for d in ("cuda", "hip") if d in _core.devices() and _present(d)]
on_gpu = pytest.mark.parametrize(
    "device", GPUS or [pytest.param("none", marks=pytest.mark.skip(reason="no GPU backend built or no device present"))])
QUANT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
KINDS = ("fp32", "fp16", "bf16", "q8", "q4", "nf4")


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sum((a - b) ** 2) / max(np.sum(b ** 2), 1e-30))


def _rows(type_: str, rows: int, cols: int, seed: int = 0) -> tuple[bytes, np.ndarray]:
    """Random rows stored as type_, and the values they hold."""
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    data = b"".join(_core.quantize(type_, w[r]) for r in range(rows))
    return data, np.stack([_core.dequantize(type_, _core.quantize(type_, w[r]), cols) for r in range(rows)])


# ---- everywhere: device names, the shared block arithmetic, the harness on the CPU

def test_device_names_are_checked(tiny_models):
    directory, _ = tiny_models["llama"]
    for bad in ("tpu", "cuda:x", "cuda:", "hip:12345"):
        with pytest.raises(InvalidArgumentError):
            tokenmill.load(directory, device=bad)
    for vendor, flag in (("cuda", "TOKENMILL_CUDA=ON"), ("hip", "TOKENMILL_HIP=ON")):
        if vendor not in _core.devices():
            with pytest.raises(UnsupportedModelError, match=flag):
                tokenmill.load(directory, device=vendor)


def test_half_and_bfloat_conversions_are_exact():
    # every fp16 pattern decodes as numpy does (the kernels of both backends share this code)
    bits = np.arange(65536, dtype=np.uint16)
    ours = _core.dequantize("f16", bits.tobytes(), 65536)
    ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(ours), nan) and np.array_equal(ours[~nan], ref[~nan])
    # rounding to fp16 (ties to even, subnormals, overflow) and to bf16 as numpy / torch round
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(4096) * s for s in (1e-7, 1e-5, 1.0, 3e4, 7e4)]).astype(np.float32)
    x = np.concatenate([x, np.float32([0.0, -0.0, np.inf, -np.inf, 65504.0, 65520.0, 2.0 ** -24, 2.0 ** -25])])
    with np.errstate(over="ignore"):   # values past fp16's range become inf, as intended
        half = x.astype(np.float16).view(np.uint16)
    assert np.frombuffer(_core.quantize("f16", x), np.uint16).tolist() == half.tolist()
    bf = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.frombuffer(_core.quantize("bf16", x), np.uint16).tolist() == bf.tolist()


@pytest.mark.parametrize("type_", QUANT_TYPES)
def test_op_harness_on_the_cpu_matches_numpy(type_):
    data, w = _rows(type_, 40, 96)
    x = np.random.default_rng(2).standard_normal((9, 96)).astype(np.float32)
    bias = np.linspace(-1, 1, 40).astype(np.float32)
    for mode in ("fast", "as_decode", "invariant"):
        got = _testing.backend_matmul("cpu", type_, data, 40, x, mode, bias)
        assert nmse(got, x.astype(np.float64) @ w.T.astype(np.float64) + bias) < 1e-10
    assert np.array_equal(_testing.backend_get_rows("cpu", type_, data, 40, 96, [3, 0, 39]), w[[3, 0, 39]])


def test_op_harness_elementwise_norm_rope_lora_on_the_cpu_match_numpy():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((2, 5, 64)).astype(np.float32)
    wt, b = rng.standard_normal((2, 64)).astype(np.float32)
    x64 = x.astype(np.float64)
    rms = x64 / np.sqrt(np.mean(x64 ** 2, axis=1, keepdims=True) + 1e-5) * wt
    assert nmse(_testing.backend_op("cpu", "rms_norm", x, weight=wt, value=1e-5), rms) < 1e-12
    ln = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-5) * wt + b
    assert nmse(_testing.backend_op("cpu", "layer_norm", x, weight=wt, bias=b, value=1e-5), ln) < 1e-12
    assert nmse(_testing.backend_op("cpu", "swiglu", x, y), x64 / (1 + np.exp(-x64)) * y) < 1e-12
    assert nmse(_testing.backend_op("cpu", "scale", x, value=0.5), x64 * 0.5) == 0.0
    pos = [0, 3, 17, 100, 1000]
    half = 8
    ang = np.array(pos)[:, None] * (10000.0 ** (-np.arange(half) * 2 / 16))[None, :]
    xr = x.reshape(5, 4, 16).astype(np.float64)
    a, bb = xr[..., :half], xr[..., half:]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    ref = np.concatenate([a * c - bb * s, a * s + bb * c], axis=-1).reshape(5, 64)
    assert nmse(_testing.backend_rope("cpu", x, 4, pos, 10000.0, "halves"), ref) < 1e-10
    A, BT, out0 = rng.standard_normal((4, 64)).astype(np.float32), rng.standard_normal((4, 48)).astype(np.float32), \
        rng.standard_normal((5, 48)).astype(np.float32)
    assert nmse(_testing.backend_lora("cpu", x, A, BT, 0.25, out0), out0 + 0.25 * (x64 @ A.T) @ BT) < 1e-12
    Ah, BTh = A.astype(np.float16).astype(np.float64), BT.astype(np.float16).astype(np.float64)
    for level in _core.cpu_levels():   # the fp16 kernels at every level
        before = _core.cpu_level()
        _core.set_cpu_level(level)
        try:
            got = _testing.backend_lora("cpu", x, A, BT, 0.25, out0, True)
        finally:
            _core.set_cpu_level(before)
        assert nmse(got, out0 + 0.25 * (x64 @ Ah.T) @ BTh) < 1e-12, level


# ---- on a device: each op against the CPU backend

@on_gpu
@pytest.mark.parametrize("type_", QUANT_TYPES)
@pytest.mark.parametrize("T", [1, 5, 40, 130])
@pytest.mark.parametrize("mode", ["fast", "as_decode", "invariant"])
def test_matmul_matches_cpu(device, type_, T, mode):
    data, _ = _rows(type_, 72, 160, seed=T)
    x = np.random.default_rng(T).standard_normal((T, 160)).astype(np.float32)
    bias = np.random.default_rng(5).standard_normal(72).astype(np.float32)
    ref = _testing.backend_matmul("cpu", type_, data, 72, x, mode, bias)
    got = _testing.backend_matmul(device, type_, data, 72, x, mode, bias)
    assert nmse(got, ref) < 1e-10


@on_gpu
def test_rows_of_a_batch_equal_rows_alone(device):
    # as decode, each token's result is its one-token result, bit for bit; invariant, every row is
    # the same whatever rows share the call
    data, _ = _rows("q4_1", 64, 128)
    x = np.random.default_rng(6).standard_normal((12, 128)).astype(np.float32)
    for mode in ("as_decode", "invariant"):
        batch = _testing.backend_matmul(device, "q4_1", data, 64, x, mode)
        alone = np.concatenate([_testing.backend_matmul(device, "q4_1", data, 64, x[t:t + 1], mode) for t in range(12)])
        assert np.array_equal(batch, alone)


@on_gpu
@pytest.mark.parametrize("type_", QUANT_TYPES)
def test_get_rows_matches_cpu(device, type_):
    data, w = _rows(type_, 50, 64)
    ids = [49, 0, 7, 7, 23]
    assert np.array_equal(_testing.backend_get_rows(device, type_, data, 50, 64, ids), w[ids])


@on_gpu
@pytest.mark.parametrize("op", ["add", "swiglu", "geglu", "gelu", "gelu_erf", "scale", "rms_norm", "layer_norm"])
def test_elementwise_and_norms_match_cpu(device, op):
    rng = np.random.default_rng(7)
    x, y = (rng.standard_normal((2, 37, 576)) * 3).astype(np.float32)
    wt, b = rng.standard_normal((2, 576)).astype(np.float32)
    kw = dict(y=y if op in ("add", "swiglu", "geglu") else None, weight=wt if "norm" in op else None,
              bias=b if op == "layer_norm" else None, value=1e-5 if "norm" in op else 0.7)
    assert nmse(_testing.backend_op(device, op, x, **kw), _testing.backend_op("cpu", op, x, **kw)) < 1e-12


@on_gpu
@pytest.mark.parametrize("style", ["adjacent", "halves"])
def test_rope_matches_cpu(device, style):
    x = np.random.default_rng(8).standard_normal((6, 3 * 64)).astype(np.float32)
    pos = [0, 1, 31, 500, 4095, 70000]
    factors = np.linspace(1, 8, 32).astype(np.float32)
    for ff in (None, factors):
        ref = _testing.backend_rope("cpu", x, 3, pos, 500000.0, style, ff)
        assert nmse(_testing.backend_rope(device, x, 3, pos, 500000.0, style, ff), ref) < 1e-12


@on_gpu
def test_lora_matches_cpu(device):
    rng = np.random.default_rng(9)
    x, out0 = rng.standard_normal((7, 96)).astype(np.float32), rng.standard_normal((7, 80)).astype(np.float32)
    A, BT = rng.standard_normal((16, 96)).astype(np.float32), rng.standard_normal((16, 80)).astype(np.float32)
    for half in (False, True):
        ref = _testing.backend_lora("cpu", x, A, BT, 0.5, out0, half)
        assert nmse(_testing.backend_lora(device, x, A, BT, 0.5, out0, half), ref) < 1e-12


@on_gpu
@pytest.mark.parametrize("k_kind, v_kind", [(k, k) for k in KINDS] + [("q8", "q4"), ("fp16", "nf4")])
@pytest.mark.parametrize("T, N, window, ring", [(1, 300, 0, 0), (1, 700, 0, 40), (24, 24, 0, 0), (9, 600, 128, 16)])
def test_attention_matches_cpu(device, k_kind, v_kind, T, N, window, ring):
    if ring and k_kind in ("fp32", "fp16") and v_kind in ("fp32", "fp16"):
        ring = 0   # no ring for kinds at fp16 or above
    rng = np.random.default_rng(T + N)
    q = rng.standard_normal((T, 6 * 64)).astype(np.float32)
    k, v = rng.standard_normal((2, N, 2 * 64)).astype(np.float32)
    args = (q, k, v, 6, 2, k_kind, v_kind, window, ring)
    ref = _testing.attention(*args, device="cpu")
    assert nmse(_testing.attention(*args, device=device), ref) < 1e-10


# ---- on a device: whole models against the CPU

PROMPT = [5, 17, 99, 3, 250, 42, 8, 77, 19, 140, 64, 2, 31, 300, 12, 9, 44, 180, 7, 66, 123, 1, 90, 222]


def _logits(model, ids, prompt_len):
    cache = model.new_cache()
    rows = [model.eval(cache, ids[:prompt_len], logits="all").logits]
    rows += [model.eval(cache, [t]).logits for t in ids[prompt_len:]]
    return np.concatenate(rows)


@on_gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("weights", [None, "f16", "q8_0", "q4_0", "q4_1"])
def test_models_match_cpu(device, tiny_models, arch, weights):
    directory, _ = tiny_models[arch]
    cpu = tokenmill.load(directory, weights=weights)
    gpu = tokenmill.load(directory, weights=weights, device=device)
    assert nmse(_logits(gpu, PROMPT, 16), _logits(cpu, PROMPT, 16)) < 1e-9
    assert tokenmill.generate(gpu, PROMPT[:8], max_new_tokens=32, temperature=0, ignore_eos=True) == \
        tokenmill.generate(cpu, PROMPT[:8], max_new_tokens=32, temperature=0, ignore_eos=True)


@on_gpu
@pytest.mark.parametrize("kind", ["fp16", "q8", "q4", "nf4"])
def test_cache_kinds_match_cpu(device, tiny_models, kind):
    from tokenmill.engine.cache import CacheSpec

    directory, _ = tiny_models["llama"]
    spec = CacheSpec(k_kind=kind, v_kind=kind, residual_len=4 if kind != "fp16" else 0)
    out = []
    for dev in ("cpu", device):
        model = tokenmill.load(directory, device=dev)
        cache = model.new_cache(spec=spec)
        rows = [model.eval(cache, PROMPT[:12], logits="all").logits]
        rows += [model.eval(cache, [t]).logits for t in PROMPT[12:]]
        out.append(np.concatenate(rows))
    assert nmse(out[1], out[0]) < 1e-9


@on_gpu
def test_batches_adapters_and_memory_on_the_device(device, tiny_models, tmp_path):
    import copy

    import peft

    directory, hf = tiny_models["llama"]
    prompts = [PROMPT[:5], PROMPT[3:17], PROMPT[:2], PROMPT[6:24]]
    cpu, gpu = tokenmill.load(directory), tokenmill.load(directory, device=device)
    single = [tokenmill.generate(gpu, p, max_new_tokens=12, temperature=0, ignore_eos=True) for p in prompts]
    assert gpu.generate_batch(prompts, max_new_tokens=12, temperature=0, ignore_eos=True) == single
    assert single == [tokenmill.generate(cpu, p, max_new_tokens=12, temperature=0, ignore_eos=True) for p in prompts]
    # a LoRA adapter
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "lora")
    for m in (cpu, gpu):
        m.load_adapter(tmp_path / "lora", name="a")
    ref = cpu.generate(PROMPT[:8], max_new_tokens=16, temperature=0, ignore_eos=True, adapter="a")
    assert gpu.generate(PROMPT[:8], max_new_tokens=16, temperature=0, ignore_eos=True, adapter="a") == ref
    # memory layers
    ckpt = write_checkpoint(tmp_path / "mem", hf.config, CHAPTERED, random_memory(hf.config, CHAPTERED, seed=2))
    mc, mg = tokenmill.load(directory, memory=ckpt), tokenmill.load(directory, memory=ckpt, device=device)
    assert nmse(_logits(mg, PROMPT, 10), _logits(mc, PROMPT, 10)) < 1e-9
