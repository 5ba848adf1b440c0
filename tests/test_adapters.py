"""LoRA adapters against PEFT on tiny random models: run-time logits and merged weights equal the
PEFT model's (f32, 1e-4), greedy continuations identical; llama.cpp's GGUF LoRA layout (written with
the `gguf` package) gives the same logits; batches mixing adapters equal their sequences run alone;
bad adapters fail with errors that name the problem. Also `export_to_gguf` against tokenmill's own
HF-directory logits and the `gguf` reader."""

import copy
import json

import gguf
import numpy as np
import safetensors.torch
import peft  # test extras: the reference, never optional
import pytest
import torch

import tokenmill
from tokenmill import GenerateConfig, Generator, Scheduler
from tokenmill.errors import InvalidArgumentError, ModelFileError, ModelFormatError, UnsupportedModelError
from tokenmill.tools.export import export_to_gguf
from tokenmill.tools.merge import merge_adapter

from gguf_util import permute_for_gguf, write_tiny_gguf

PROMPT = [3, 17, 101, 45, 9, 250, 77, 12, 190, 5, 66, 31, 140, 8, 222, 19]
# arch, rank, target modules, rsLoRA
CASES = [
    ("llama", 4, "all-linear", False),
    ("llama", 16, ("q_proj", "v_proj"), True),
    ("qwen2", 16, "all-linear", True),
    ("mistral", 4, ("o_proj", "gate_proj", "down_proj"), False),
    ("gpt2", 4, ("c_attn", "c_fc"), False),
    ("gpt2", 16, ("c_attn", "c_proj", "c_fc"), True),
]


def _peft_model(hf_model, arch, r, targets, rslora, seed=0):
    torch.manual_seed(seed)
    targets = list(targets) if isinstance(targets, tuple) else targets
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_rslora=rslora, init_lora_weights=False,
                          fan_in_fan_out=arch == "gpt2")
    pm = peft.get_peft_model(copy.deepcopy(hf_model), cfg).eval()
    with torch.no_grad():   # B is random but small, so the adapter moves logits without swamping them
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)
    return pm


def _hf_logits(pm, ids):
    with torch.no_grad():
        return pm(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    """case -> (HF directory, PEFT model, adapter directory)."""
    out = {}
    for i, (arch, r, targets, rslora) in enumerate(CASES):
        directory, hf_model = tiny_models[arch]
        pm = _peft_model(hf_model, arch, r, targets, rslora, seed=i)
        ad = tmp_path_factory.mktemp(f"lora-{arch}-{r}")
        pm.save_pretrained(ad)
        out[CASES[i]] = (directory, pm, ad)
    return out


@pytest.mark.parametrize("case", CASES, ids=[f"{a}-r{r}-{'rs' if rs else 'plain'}" for a, r, _, rs in CASES])
def test_runtime_adapter_equals_peft(adapters, case):
    directory, pm, ad = adapters[case]
    model = tokenmill.load(directory)
    info = model.load_adapter(ad, name="a")
    assert info.format == "peft" and info.ranks == (case[1],) and info.n_params > 0
    want = _hf_logits(pm, PROMPT)
    got = model.eval(model.new_cache(64), PROMPT, logits="all", adapter="a").logits
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    with pm.disable_adapter():
        base = _hf_logits(pm, PROMPT)
    assert np.abs(want - base).max() > 0.05   # the adapter matters, so the comparison means something
    np.testing.assert_allclose(model.eval(model.new_cache(64), PROMPT, logits="all").logits, base, atol=1e-4, rtol=0)

    # greedy 32 tokens: each is PEFT's argmax on the same context
    ids = Generator(model, GenerateConfig(temperature=0, max_new_tokens=32, ignore_eos=True), adapter="a").generate(PROMPT)
    assert len(ids) == 32
    ref = _hf_logits(pm, PROMPT + ids[:-1])[len(PROMPT) - 1:]
    assert ref.argmax(axis=1).tolist() == ids


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4]], ids=["llama", "qwen2", "gpt2"])
def test_merged_model_equals_peft(adapters, case, tmp_path):
    directory, pm, ad = adapters[case]
    out = merge_adapter(directory, ad, tmp_path / "merged")
    merged = tokenmill.load(out)
    got = merged.eval(merged.new_cache(64), PROMPT, logits="all").logits
    np.testing.assert_allclose(got, _hf_logits(pm, PROMPT), atol=1e-4, rtol=0)
    # and into a GGUF file through the exporter: the same logits
    gg = tokenmill.load(merge_adapter(directory, ad, tmp_path / "merged.gguf", type="f32"))
    np.testing.assert_allclose(gg.eval(gg.new_cache(64), PROMPT, logits="all").logits, got, atol=1e-5, rtol=0)


def _write_gguf_lora(pm, arch, path, alpha, n_head, n_head_kv):
    """The adapter in llama.cpp's GGUF LoRA layout, as its convert_lora_to_gguf writes it: tensors
    blk.N.<stem>.weight.lora_a [r, n_in] and .lora_b [n_out, r] (numpy order), Q/K rows of B permuted
    for the llama architecture."""
    stems = {"q_proj": ("attn_q", n_head), "k_proj": ("attn_k", n_head_kv), "v_proj": ("attn_v", 0),
             "o_proj": ("attn_output", 0), "gate_proj": ("ffn_gate", 0), "up_proj": ("ffn_up", 0),
             "down_proj": ("ffn_down", 0)}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(alpha))
    for name, p in pm.named_parameters():
        if "lora_A" not in name:
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        module = name.split(".lora_A")[0].rsplit(".", 1)[1]
        stem, heads = stems[module]
        a = p.detach().numpy().astype(np.float32)
        b = dict(pm.named_parameters())[name.replace("lora_A", "lora_B")].detach().numpy().astype(np.float32)
        if arch == "llama" and heads:
            b = permute_for_gguf(b, heads)
        w.add_tensor(f"blk.{layer}.{stem}.weight.lora_a", a)
        w.add_tensor(f"blk.{layer}.{stem}.weight.lora_b", b.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_lora_equals_peft_on_gguf_and_hf_bases(adapters, tiny_models, tmp_path):
    directory, pm, ad = adapters[CASES[0]]
    hf_model = tiny_models["llama"][1]
    cfg = hf_model.config
    base_gguf = tmp_path / "base.gguf"
    write_tiny_gguf(hf_model, "llama", base_gguf)
    lora = _write_gguf_lora(pm, "llama", tmp_path / "lora.gguf", alpha=2 * CASES[0][1], n_head=cfg.num_attention_heads,
                            n_head_kv=cfg.num_key_value_heads)
    want = _hf_logits(pm, PROMPT)
    for base in (base_gguf, directory):   # a GGUF base (rotate-adjacent Q/K rows) and an HF one (halves)
        for path in (lora, ad):           # either adapter format on either base
            model = tokenmill.load(base)
            info = model.load_adapter(path, name="x")
            got = model.eval(model.new_cache(64), PROMPT, logits="all", adapter="x").logits
            np.testing.assert_allclose(got, want, atol=2e-3 if info.format == "gguf" else 1e-4, rtol=0)


def test_a_batch_mixing_adapters_equals_each_sequence_alone(adapters):
    directory, pm, ad = adapters[CASES[0]]
    _, _, ad2 = adapters[CASES[1]]
    model = tokenmill.load(directory)
    model.load_adapter(ad, name="a")
    model.load_adapter(ad2, name="b", scale=0.5)
    choices = ["a", None, "b", {"a": 1.0, "b": -1.0}]
    prompts = [PROMPT, PROMPT[3:], PROMPT[:9], PROMPT[::-1]]
    cfg = GenerateConfig(temperature=0, max_new_tokens=12, ignore_eos=True)
    alone = [Generator(model, cfg, adapter=c).generate(p) for c, p in zip(choices, prompts)]
    assert len({tuple(a) for a in alone}) == 4
    # one scheduler, all four at once: exact greedy equality (batch-invariant steps)
    sched = Scheduler(model, kv_budget_mb=16)
    reqs = [sched.submit(p, cfg, adapter=c)[0] for c, p in zip(choices, prompts)]
    sched.run_until_done()
    assert [r.wait(0).token_ids for r in reqs] == alone
    # one forward pass: each sequence's rows equal the sequence run alone (decode_exact rows)
    slots = [model.adapter_slot(c) for c in choices]
    together = model.eval_batch([model.new_cache(64) for _ in prompts], prompts, logits="all", adapters=slots,
                                decode_exact=True).logits
    row = 0
    for c, p in zip(choices, prompts):
        single = model.eval(model.new_cache(64), p, logits="all", adapter=c, decode_exact=True).logits
        np.testing.assert_array_equal(together[row : row + len(p)], single)
        row += len(p)
    # the mixture's two adapters add to the same rows: every run adds them in the same order (they
    # once raced across threads, changing the last bits about one run in 300)
    for _ in range(200):
        again = model.eval_batch([model.new_cache(64) for _ in prompts], prompts, logits="all", adapters=slots,
                                 decode_exact=True).logits
        np.testing.assert_array_equal(again, together)


def test_prefix_cache_and_generators_are_keyed_by_adapter(adapters):
    directory, _, ad = adapters[CASES[0]]
    model = tokenmill.load(directory)
    model.load_adapter(ad, name="a")
    prompt = PROMPT * 3   # several whole blocks of 16
    cfg = GenerateConfig(temperature=0, max_new_tokens=6, ignore_eos=True)
    base = Generator(model, cfg).generate(prompt)
    adapted = Generator(model, cfg, adapter="a").generate(prompt)
    assert base != adapted
    sched = Scheduler(model, kv_budget_mb=16, block_size=16)
    first = sched.submit(prompt, cfg, adapter="a")[0]
    sched.run_until_done()
    second = sched.submit(prompt, cfg)[0]   # same tokens, base model: must not reuse the adapter's blocks
    third = sched.submit(prompt, cfg, adapter="a")[0]
    sched.run_until_done()
    assert first.wait(0).token_ids == adapted and second.wait(0).token_ids == base and third.wait(0).token_ids == adapted
    gen = Generator(model, cfg, adapter="a")
    with pytest.raises(InvalidArgumentError, match="adapter"):
        gen.generate(prompt, adapter=None)   # the cache holds K/V computed with "a"


def test_mixes_scales_and_unloading(adapters):
    directory, pm, ad = adapters[CASES[0]]
    model = tokenmill.load(directory)
    model.load_adapter(ad, name="a")
    base = model.eval(model.new_cache(64), PROMPT, logits="all").logits
    full = model.eval(model.new_cache(64), PROMPT, logits="all", adapter="a").logits
    zero = model.eval(model.new_cache(64), PROMPT, logits="all", adapter={"a": 0.0}).logits
    np.testing.assert_array_equal(zero, base)
    double = model.eval(model.new_cache(64), PROMPT, logits="all", adapter={"a": 2.0}).logits
    assert np.abs(full - base).max() > 0.05 and np.abs(double - full).max() > 0.05
    model.load_adapter(ad, name="a2")
    both = model.eval(model.new_cache(64), PROMPT, logits="all", adapter={"a": 1.0, "a2": 1.0}).logits
    np.testing.assert_allclose(both, double, atol=1e-4, rtol=0)   # two copies at 1.0 = one at 2.0
    model.unload_adapter("a")
    with pytest.raises(InvalidArgumentError, match="no adapter named 'a'"):
        model.eval(model.new_cache(64), PROMPT, adapter="a")
    with pytest.raises(InvalidArgumentError, match="loaded already"):
        model.load_adapter(ad, name="a2")
    assert list(model.adapters) == ["a2"]


def _edit_adapter(src, dst, config=None, drop=None, tensors=None):
    """A copy of a PEFT adapter directory with its config or tensors changed."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    t = load_file(str(src / "adapter_model.safetensors"))
    for k in [k for k in t if drop and drop in k]:
        del t[k]
    t.update(tensors or {})
    save_file(t, str(dst / "adapter_model.safetensors"))
    return dst


def test_bad_adapters_fail_clearly(adapters, tiny_models, tmp_path):
    directory, pm, ad = adapters[CASES[0]]
    model = tokenmill.load(directory)
    a_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    cases = [
        (dict(config={"use_dora": True}), UnsupportedModelError, "use_dora"),
        (dict(config={"modules_to_save": ["lm_head"]}), UnsupportedModelError, "modules_to_save"),
        (dict(config={"target_modules": ["q_proj", "lm_head"]}), UnsupportedModelError, "lm_head"),
        (dict(config={"r": 8}), ModelFormatError, "rank 4 but adapter_config.json says 8"),
        (dict(drop="layers.1.mlp.up_proj.lora_B"), ModelFormatError, "lora_A but no lora_B"),
        (dict(tensors={a_key: np.zeros((4, 65), np.float32)}), InvalidArgumentError, "projection is"),
        (dict(tensors={"base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32)}),
         UnsupportedModelError, "lm_head"),
        (dict(tensors={a_key: np.full((4, 64), np.nan, np.float32)}), tokenmill.errors.NumericalError, "NaN"),
    ]
    for i, (edit, error, match) in enumerate(cases):
        bad = _edit_adapter(ad, tmp_path / f"bad{i}", **edit)
        with pytest.raises(error, match=match):
            model.load_adapter(bad)
    # an adapter made for another model (gpt2's shapes on a llama)
    _, _, gpt2_ad = adapters[CASES[4]]
    with pytest.raises(UnsupportedModelError, match="c_attn"):
        model.load_adapter(gpt2_ad)
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "adapter_config.json").write_text("{}")
    (tmp_path / "pickle" / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelFileError, match="pickle"):
        model.load_adapter(tmp_path / "pickle")
    with pytest.raises(FileNotFoundError):
        model.load_adapter(tmp_path / "nowhere")
    with pytest.raises(InvalidArgumentError):
        GenerateConfig(adapter={"a": float("nan")})
    with pytest.raises(InvalidArgumentError):
        model.eval(model.new_cache(8), [1, 2], adapter=3)
    assert model.adapters == {}   # nothing half-loaded stayed behind


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_export_to_gguf_round_trips(tiny_models, arch, tmp_path):
    directory, _ = tiny_models[arch]
    out = export_to_gguf(directory, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(str(out))   # the format's reference reader
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "blk.0.attn_norm.weight" in names
    assert str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8") == arch
    hf = tokenmill.load(directory)
    gg = tokenmill.load(out)
    np.testing.assert_allclose(gg.eval(gg.new_cache(64), PROMPT, logits="all").logits,
                               hf.eval(hf.new_cache(64), PROMPT, logits="all").logits, atol=1e-5, rtol=0)
    q8 = tokenmill.load(export_to_gguf(directory, tmp_path / "q8.gguf", "q8_0"))
    ref = tokenmill.load(directory, weights="q8_0")
    # the same q8_0 blocks either way (llama's RoPE pairs are ordered differently: float rounding only)
    np.testing.assert_allclose(q8.eval(q8.new_cache(64), PROMPT, logits="all").logits,
                               ref.eval(ref.new_cache(64), PROMPT, logits="all").logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("level", tokenmill._core.cpu_levels())
def test_adapter_at_every_cpu_level_equals_peft(adapters, level):
    """The low-rank op's kernels (rows_dot_f32, the strided rows_axpy_f32) at each level this CPU runs."""
    directory, pm, ad = adapters[CASES[2]]
    model = tokenmill.load(directory)
    model.load_adapter(ad, name="a")
    before = tokenmill._core.cpu_level()
    tokenmill._core.set_cpu_level(level)
    try:
        got = model.eval(model.new_cache(64), PROMPT, logits="all", adapter="a").logits
    finally:
        tokenmill._core.set_cpu_level(before)
    np.testing.assert_allclose(got, _hf_logits(pm, PROMPT), atol=1e-4, rtol=0)


@pytest.mark.parametrize("level", tokenmill._core.cpu_levels())
def test_an_f16_adapter_is_kept_in_fp16_and_equals_peft(adapters, tmp_path, level):
    """Pairs that fp16 holds exactly (an adapter saved in f16) are stored in fp16, half the bytes, and
    give PEFT's logits on those same values at every CPU level; an f32 adapter stays f32."""
    directory, pm, ad = adapters[CASES[0]]
    half = copy.deepcopy(pm)
    with torch.no_grad():
        for name, p in half.named_parameters():
            if "lora_" in name:
                p.copy_(p.half().float())
    half.save_pretrained(tmp_path)
    assert all(t.dtype == torch.float32 for t in safetensors.torch.load_file(tmp_path / "adapter_model.safetensors").values())
    f16 = {k: v.half() for k, v in safetensors.torch.load_file(tmp_path / "adapter_model.safetensors").items()}
    safetensors.torch.save_file(f16, tmp_path / "adapter_model.safetensors")
    model = tokenmill.load(directory)
    f32_info, f16_info = model.load_adapter(ad, name="f32"), model.load_adapter(tmp_path, name="f16")
    assert f16_info.stored_bytes * 2 == f32_info.stored_bytes == 4 * f32_info.n_params
    before = tokenmill._core.cpu_level()
    tokenmill._core.set_cpu_level(level)
    try:
        got = model.eval(model.new_cache(64), PROMPT, logits="all", adapter="f16").logits
    finally:
        tokenmill._core.set_cpu_level(before)
    np.testing.assert_allclose(got, _hf_logits(half, PROMPT), atol=1e-4, rtol=0)


def test_an_f32_adapter_loaded_as_f16_equals_it_saved_in_f16(adapters, tmp_path):
    """dtype="f16" rounds an f32 adapter's pairs to fp16: half the stored bytes, and logits bit for bit
    those of the same adapter saved in f16; values beyond fp16's range and unknown dtypes are refused."""
    directory, pm, ad = adapters[CASES[0]]
    tensors = safetensors.torch.load_file(ad / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    saved_f16 = tmp_path / "f16"
    saved_f16.mkdir()
    (saved_f16 / "adapter_config.json").write_text((ad / "adapter_config.json").read_text())
    safetensors.torch.save_file({k: v.half() for k, v in tensors.items()}, saved_f16 / "adapter_model.safetensors")
    model = tokenmill.load(directory)
    f32 = model.load_adapter(ad, name="f32")
    rounded = model.load_adapter(ad, name="rounded", dtype="f16")
    saved = model.load_adapter(saved_f16, name="saved")
    assert rounded.stored_bytes == saved.stored_bytes == f32.stored_bytes // 2
    logits = {n: model.eval(model.new_cache(64), PROMPT, logits="all", adapter=n).logits for n in ("f32", "rounded", "saved")}
    np.testing.assert_array_equal(logits["rounded"], logits["saved"])
    assert 0 < np.abs(logits["rounded"] - logits["f32"]).max() < 1e-3   # fp16 rounding of the pairs, no more
    with pytest.raises(InvalidArgumentError, match="dtype"):
        model.load_adapter(ad, name="x", dtype="bf16")
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "adapter_config.json").write_text((ad / "adapter_config.json").read_text())
    big = {k: (v * 1e6 if "lora_A" in k else v) for k, v in tensors.items()}
    safetensors.torch.save_file(big, huge / "adapter_model.safetensors")
    with pytest.raises(InvalidArgumentError, match="beyond fp16's range"):
        model.load_adapter(huge, name="huge", dtype="f16")
    assert model.load_adapter(huge, name="huge").stored_bytes == f32.stored_bytes   # kept in f32 by default
