"""Side-by-side throughput against peer engines on the same GGUF file (a benchmark, never a test):
tokenmill, llama.cpp through llama-cpp-python, and HF transformers on torch CPU (the GGUF dequantized
to float32). Runs alternate between engines so drift on a shared machine hits all of them alike;
medians are reported with ratios to tokenmill.

    tokenmill bench --peers --model model.gguf [--prompt-len 128] [--num-tokens 64] [--depth 0]
    tokenmill bench --peers --random-shape qwen2.5-0.5b --types f16,q8_0,q4_0
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np


def _ids(n_vocab: int, n: int) -> list[int]:
    return [(i * 2654435761) % n_vocab for i in range(n)]


class _Tokenmill:
    name = "tokenmill"

    def __init__(self, path, threads, cache_kind, int8_prefill=False):
        from ..api import load
        from ..engine.cache import CacheSpec

        self.model = load(path, n_threads=threads, int8_prefill=int8_prefill)
        self.n_vocab = self.model.n_vocab
        self.spec = CacheSpec(cache_kind, cache_kind)

    def run(self, prompt, gen, depth):
        m = self.model
        cache = m.new_cache(depth + len(prompt) + gen + 1, self.spec)
        if depth:
            m.eval(cache, np.asarray(_ids(self.n_vocab, depth), np.int32), logits=None)
        t0 = time.perf_counter()
        m.eval(cache, np.asarray(prompt, np.int32))
        t1 = time.perf_counter()
        tok = np.zeros(1, np.int32)
        for i in range(gen):
            tok[0] = (i * 7919) % self.n_vocab
            m.eval(cache, tok)
        return t1 - t0, time.perf_counter() - t1


# llama.cpp's KV cache type (ggml type id) for each tokenmill cache kind it has
_LLAMA_KV_TYPES = {"fp32": 0, "fp16": 1, "bf16": 30, "q8": 8, "q4": 2}


class _LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path, threads, n_ctx, cache_kind):
        import llama_cpp

        if cache_kind not in _LLAMA_KV_TYPES:
            raise ValueError(f"llama.cpp has no KV cache type like {cache_kind!r}")
        kv = _LLAMA_KV_TYPES[cache_kind]
        # a quantized V cache needs flash attention in llama.cpp
        self.llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                   n_batch=512, type_k=kv, type_v=kv, flash_attn=kv in (2, 8), verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def run(self, prompt, gen, depth):
        self.llm.reset()   # the next eval drops cache entries past position 0
        if depth:
            self.llm.eval(_ids(self.n_vocab, depth))
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        t1 = time.perf_counter()
        for i in range(gen):
            self.llm.eval([(i * 7919) % self.n_vocab])
        return t1 - t0, time.perf_counter() - t1


class _Transformers:
    name = "transformers"

    def __init__(self, path, threads):
        import torch
        import transformers

        torch.set_num_threads(threads)
        path = Path(path)
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        self.n_vocab = self.model.config.vocab_size

    def run(self, prompt, gen, depth):
        torch = self.torch
        with torch.no_grad():
            past = None
            if depth:
                past = self.model(torch.tensor([_ids(self.n_vocab, depth)]), use_cache=True).past_key_values
            t0 = time.perf_counter()
            past = self.model(torch.tensor([prompt]), past_key_values=past, use_cache=True).past_key_values
            t1 = time.perf_counter()
            for i in range(gen):
                past = self.model(torch.tensor([[(i * 7919) % self.n_vocab]]), past_key_values=past,
                                  use_cache=True).past_key_values
        return t1 - t0, time.perf_counter() - t1


def compare(path, threads: int = 2, prompt_len: int = 128, gen: int = 64, depth: int = 0, repeats: int = 5,
            engines=("tokenmill", "llama.cpp", "transformers"), cache_kind: str = "fp32", int8_prefill: bool = False,
            log: Callable[[str], None] = print) -> list[dict]:
    """Median prompt and decode tok/s of each engine; the KV cache is cache_kind for tokenmill and
    llama.cpp alike (transformers keeps its float32 cache); int8_prefill is tokenmill's load option."""
    makers = {
        "tokenmill": lambda: _Tokenmill(path, threads, cache_kind, int8_prefill),
        "llama.cpp": lambda: _LlamaCpp(path, threads, depth + prompt_len + gen + 16, cache_kind),
        "transformers": lambda: _Transformers(path, threads),
    }
    runners = []
    for name in engines:
        try:
            runners.append(makers[name]())
        except ImportError as exc:
            log(f"skipping {name}: {exc}")
    prompt = _ids(runners[0].n_vocab, prompt_len)
    samples = {r.name: ([], []) for r in runners}
    for r in runners:   # warm-up
        r.run(prompt[:16], 4, 0)
    for _ in range(repeats):
        for r in runners:   # alternate engines within each repeat
            pp, tg = r.run(prompt, gen, depth)
            samples[r.name][0].append(prompt_len / pp)
            samples[r.name][1].append(gen / tg if gen else 0.0)
    base_pp = statistics.median(samples["tokenmill"][0]) if "tokenmill" in samples else None
    base_tg = statistics.median(samples["tokenmill"][1]) if "tokenmill" in samples else None
    rows = []
    for name, (pp, tg) in samples.items():
        mpp, mtg = statistics.median(pp), statistics.median(tg)
        rows.append({
            "engine": name, "model": Path(path).name, "threads": threads, "depth": depth,
            "kv": cache_kind if name != "transformers" else "fp32",
            f"pp{prompt_len} tok/s": mpp, f"tg{gen} tok/s": mtg,
            "tokenmill/engine pp": (base_pp / mpp) if base_pp else float("nan"),
            "tokenmill/engine tg": (base_tg / mtg) if base_tg and mtg else float("nan"),
        })
    return rows


def requantized(src: Path, wtype: str, directory: Optional[Path] = None) -> Path:
    """A copy of a GGUF with its weights in another type (cached next to the source or in `directory`)."""
    from .convert import convert_gguf

    target = (directory or src.parent) / f"{src.stem}.{wtype}.gguf"
    if not target.exists():
        convert_gguf(src, target, wtype)
    return target


# Shapes of random-weight benchmark models (llama.cpp's GGUF names and keys).
RANDOM_SHAPES = {
    "qwen2.5-0.5b": dict(arch="qwen2", n_embd=896, n_layer=24, n_head=14, n_head_kv=2, n_ff=4864, n_vocab=151936,
                         rope_theta=1e6, qkv_bias=True),
    # every matrix in whole K-quant super-blocks, as in the Q4_K_M files people run
    "llama3.2-1b": dict(arch="llama", n_embd=2048, n_layer=16, n_head=32, n_head_kv=8, n_ff=8192, n_vocab=128256,
                        rope_theta=5e5, qkv_bias=False),
}


def random_model(shape: str, wtype: str, directory: Path, seed: int = 0) -> Path:
    """A GGUF of the named shape with random N(0, 0.02) weights (norms 1, tied embeddings) in wtype,
    written once into `directory`. Its tokenizer is a placeholder (one token per id, one merge): the
    benchmarks feed token ids, never text."""
    import gguf

    from ..engine.model import matrix_type
    from .convert import TARGETS, add_matrix

    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random shape {shape!r} (known: {', '.join(RANDOM_SHAPES)})")
    if wtype not in TARGETS:
        raise ValueError(f"type must be one of {', '.join(TARGETS)}, got {wtype!r}")
    target = Path(directory) / f"random-{shape}.{wtype}.gguf"
    if target.exists():
        return target
    h = RANDOM_SHAPES[shape]
    arch, E, F, V = h["arch"], h["n_embd"], h["n_ff"], h["n_vocab"]
    head_dim = E // h["n_head"]
    kv = head_dim * h["n_head_kv"]
    w = gguf.GGUFWriter(str(target.with_suffix(".tmp")), arch)
    w.add_name(f"random {shape}")
    w.add_context_length(32768)
    w.add_embedding_length(E)
    w.add_block_count(h["n_layer"])
    w.add_feed_forward_length(F)
    w.add_head_count(h["n_head"])
    w.add_head_count_kv(h["n_head_kv"])
    w.add_rope_freq_base(h["rope_theta"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab"] + [f"<{i}>" for i in range(3, V)])
    w.add_token_merges(["a b"])
    rng = np.random.default_rng(seed)

    def matrix(name, rows, cols):   # rows x cols, stored as ggml [cols, rows]
        add_matrix(w, name, (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float32),
                   matrix_type(wtype, cols) or "f16")

    def vector(name, n, value=None):
        w.add_tensor(name, np.ones(n, np.float32) if value is None else
                     (rng.standard_normal(n, dtype=np.float32) * value).astype(np.float32))

    matrix("token_embd.weight", V, E)
    vector("output_norm.weight", E)
    for layer in range(h["n_layer"]):
        p = f"blk.{layer}."
        vector(p + "attn_norm.weight", E)
        vector(p + "ffn_norm.weight", E)
        for name, rows in (("attn_q", E), ("attn_k", kv), ("attn_v", kv)):
            matrix(p + name + ".weight", rows, E)
            if h["qkv_bias"]:
                vector(p + name + ".bias", rows, 0.02)
        matrix(p + "attn_output.weight", E, E)
        matrix(p + "ffn_gate.weight", F, E)
        matrix(p + "ffn_up.weight", F, E)
        matrix(p + "ffn_down.weight", E, F)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    target.with_suffix(".tmp").rename(target)
    return target
