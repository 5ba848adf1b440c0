"""`tokenmill bench --memory`: what memory layers cost in decoding. The default model gets random
memory layers after 2 of its layers (8 chapters x 256 slots, top-2, full-rank projections; a
trainer-layout checkpoint written to a temporary directory); decode tok/s of one sequence for every
routing strategy and storage (f32 / int8 / int4) against the same model without memory, runs
alternating so drift hits every variant alike; medians of `repeats`. Also the memory's bytes: the
keys and values the kernels read, and the routing state each sequence keeps per cached token."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

SECTION = dict(num_memory_tokens=2048, memory_layer_placement="custom", memory_layer_indices=[7, 22],
               memory_sharing="shared", use_chapters=True, num_chapters=8, top_k_chapters=2, num_shared_chapters=0,
               routing_strategy_inference="hybrid", routing_window_size=128)


def random_checkpoint(hp, directory: Path, section: dict = SECTION, seed: int = 0) -> Path:
    """A trainer-layout checkpoint (config.yaml + model.safetensors) with random memory for a model of
    hyper-parameters hp: one shared plain bank, full-rank projections, a router per memory layer."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    e, qd, kd = hp.n_embd, hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    rand = lambda *shape, s=1.0: (rng.standard_normal(shape) * s).astype(np.float32)   # noqa: E731
    t = {"memory_banks.0.base_bank.memory": rand(section["num_memory_tokens"], e)}
    for layer in section["memory_layer_indices"]:
        a = f"memory_adapters.{layer}."
        t[a + "memory_layernorm.weight"] = np.ones(e, np.float32)
        for p, (n_out, n_in) in {"q": (qd, e), "k": (kd, e), "v": (kd, e), "o": (e, qd)}.items():
            t[a + f"memory_attn.{p}_proj.weight"] = rand(n_out, n_in, s=0.02)
        t[f"routers.{layer}.router.weight"] = rand(section["num_chapters"], e, s=0.02)
        t[f"routers.{layer}.router.bias"] = np.zeros(section["num_chapters"], np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(yaml.safe_dump({"memory": section}), encoding="utf-8")
    save_file(t, str(directory / "model.safetensors"))
    return directory


def run(model_path, threads: int, new_tokens: int, repeats: int) -> list[dict]:
    from ..api import load

    base = load(model_path, n_threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = load(model_path, n_threads=threads, memory=random_checkpoint(base.hparams, Path(tmp) / "memory"))
    prompt = list(range(100, 132))

    def decode(m) -> float:
        cache = m.new_cache(len(prompt) + new_tokens + 1)
        m.eval(cache, prompt)
        t = time.perf_counter()
        for k in range(new_tokens):
            m.eval(cache, [200 + k])
        return new_tokens / (time.perf_counter() - t)

    variants = [("no memory", "-", "-")] + [(s, s, "f32") for s in ("sequence", "rolling", "token", "hybrid")] + \
               [("hybrid int8", "hybrid", "int8"), ("hybrid int4", "hybrid", "int4")]
    speeds = {name: [] for name, *_ in variants}
    table_bytes = {}
    for _ in range(repeats):
        for name, strategy, quant in variants:
            if strategy == "-":
                speeds[name].append(decode(base))
                continue
            model.set_routing(strategy)
            model.memory.set_quant(quant)
            table_bytes[name] = model.memory.table_bytes
            speeds[name].append(decode(model))
    plain = statistics.median(speeds["no memory"])
    state_per_token = 4 * model.memory.settings.num_chapters * len(model.memory.layers)
    rows = []
    for name, strategy, _ in variants:
        tok_s = statistics.median(speeds[name])
        rows.append({"variant": name, "decode tok/s": tok_s, "vs no memory": tok_s / plain,
                     "memory K/V MB": table_bytes.get(name, 0) / 2**20,
                     "routing state B/token": 0 if strategy == "-" else state_per_token})
    return rows
