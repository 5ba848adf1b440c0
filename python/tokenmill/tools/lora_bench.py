"""`tokenmill bench --adapters`: what LoRA adapters cost, and `--export HF_DIR`: that llama.cpp
(llama-cpp-python) loads tokenmill's GGUF export and decodes the same greedy tokens.

Adapters are random r=16 PEFT adapters on every projection (all-linear) of the model, written to a
temporary directory in f32 and in f16 (as PEFT saves an f16 model's adapter; tokenmill then keeps
the pairs in fp16, which holds them exactly); runs alternate so drift hits every variant alike;
medians of `repeats`."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from .merge import write_safetensors

_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")


def random_adapter(model, directory: Path, rank: int = 16, seed: int = 0, dtype: str = "f32") -> Path:
    """A PEFT adapter directory with random A, B (std 0.02) on every projection of a Llama-family
    model, stored as dtype (f32 or f16)."""
    hp = model.hparams
    e, qd, kd = hp.n_embd, hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    shapes = dict(zip(_MODULES, ((e, qd), (e, kd), (e, kd), (qd, e), (e, hp.n_ff), (e, hp.n_ff), (hp.n_ff, e))))
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(hp.n_layer):
        for module, (n_in, n_out) in shapes.items():
            p = f"base_model.model.model.layers.{layer}.{module}"
            tensors[p + ".lora_A.weight"] = (dtype, (rng.standard_normal((rank, n_in)) * 0.02).astype(np.float32))
            tensors[p + ".lora_B.weight"] = (dtype, (rng.standard_normal((n_out, rank)) * 0.02).astype(np.float32))
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "adapter_model.safetensors", tensors)
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": "all-linear"}))
    return directory


def run_adapters(model_path, threads: int, new_tokens: int, repeats: int) -> list[dict]:
    from ..api import load

    m = load(model_path, n_threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(4):
            m.load_adapter(random_adapter(m, Path(tmp) / f"a{i}", seed=i), name=f"a{i}")
            m.load_adapter(random_adapter(m, Path(tmp) / f"h{i}", seed=i, dtype="f16"), name=f"h{i}")
    prompt = list(range(100, 132))

    def decode(choices):
        slots = [m.adapter_slot(c) for c in choices]
        caches = [m.new_cache(len(prompt) + new_tokens + 1) for _ in choices]
        m.eval_batch(caches, [prompt] * len(choices), adapters=slots)
        t = time.perf_counter()
        for k in range(new_tokens):
            m.eval_batch(caches, [[200 + k]] * len(choices), adapters=slots)
        return len(choices) * new_tokens / (time.perf_counter() - t)

    variants = {"1 seq, no adapter": [None], "1 seq, r16 all-linear f32": ["a0"], "1 seq, r16 all-linear f16": ["h0"],
                "4 seqs, no adapter": [None] * 4, "4 seqs, one adapter f32": ["a0"] * 4, "4 seqs, one adapter f16": ["h0"] * 4,
                "4 seqs, four adapters f32": ["a0", "a1", "a2", "a3"], "4 seqs, four adapters f16": ["h0", "h1", "h2", "h3"]}
    samples = {k: [] for k in variants}
    for _ in range(repeats):
        for name, choices in variants.items():
            samples[name].append(decode(choices))
    med = {k: statistics.median(v) for k, v in samples.items()}
    base = {1: med["1 seq, no adapter"], 4: med["4 seqs, no adapter"]}
    return [{"variant": k, "decode tok/s": round(v, 1), "vs no adapter": round(v / base[len(variants[k])], 3)}
            for k, v in med.items()]


def run_export(hf_dir, threads: int, new_tokens: int, types=("f16", "q8_0")) -> list[dict]:
    import llama_cpp

    from ..api import load
    from .export import export_to_gguf

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for wtype in types:
            path = export_to_gguf(hf_dir, Path(tmp) / f"model-{wtype}.gguf", wtype)
            m = load(path, n_threads=threads)
            ids = m.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
            ours = m.generate(ids, new_tokens, details=True, temperature=0, ignore_eos=True).token_ids
            llm = llama_cpp.Llama(str(path), n_ctx=len(ids) + new_tokens + 8, n_threads=threads, verbose=False)
            theirs = []
            for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
                theirs.append(tok)
                if len(theirs) == new_tokens:
                    break
            same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
            rows.append({"type": wtype, "llama.cpp loads it": True, "same greedy tokens": ours == theirs,
                         "first difference": "-" if same is None else same, "text": m.detokenize(ours)[:40]})
    return rows
