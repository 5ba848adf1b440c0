"""Benchmarks behind `tokenmill bench` (measurements, not tests): decode throughput at several
batch sizes, and what reusing a Generator's cache saves on a second conversation turn. Every figure
is the median of `repeats` runs."""

from __future__ import annotations

import statistics
import time
from typing import Sequence

from ..api import Model
from ..generation import GenerateConfig, Generator, generate_batch


def _prompt_ids(model: Model, n: int, salt: int = 0) -> list[int]:
    """n token ids of real text (the tokenizer's, when there is one)."""
    if model.tokenizer is not None:
        text = f"Story {salt}: the old lighthouse keeper climbed the stairs every night and watched the sea. " * (n // 8 + 2)
        ids = model.tokenize(text)
        return ids[:n]
    return [(salt * 7919 + i * 104729) % model.n_vocab for i in range(n)]


def bench_batch(model: Model, batch_sizes: Sequence[int] = (1, 4, 16), new_tokens: int = 64, prompt_len: int = 32,
                repeats: int = 3) -> list[dict]:
    """Total generated tokens per second (prefill included) for each batch size."""
    rows = []
    for b in batch_sizes:
        prompts = [_prompt_ids(model, prompt_len, salt=i) for i in range(b)]
        configs = [GenerateConfig(max_new_tokens=new_tokens, temperature=0.8, seed=i, ignore_eos=True) for i in range(b)]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            results = generate_batch(model, prompts, configs)
            times.append(time.perf_counter() - t0)
            assert sum(r.completion_tokens for r in results) == b * new_tokens
        median = statistics.median(times)
        rows.append({"batch": b, "tokens": b * new_tokens, "seconds": median, "tok_per_s": b * new_tokens / median})
    return rows


def bench_multiturn(model: Model, context_len: int = 512, turn_len: int = 16, new_tokens: int = 16,
                    repeats: int = 3) -> dict:
    """Second-turn latency with the cache reused (Generator) versus recomputed from scratch."""
    history = _prompt_ids(model, context_len)
    turn = _prompt_ids(model, turn_len, salt=1)
    config = GenerateConfig(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    reuse, scratch = [], []
    for _ in range(repeats):
        gen = Generator(model, config)
        first = gen.generate(history)
        t0 = time.perf_counter()
        gen.generate(turn)
        reuse.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        Generator(model, config).generate(history + first + turn)
        scratch.append(time.perf_counter() - t0)
    r, s = statistics.median(reuse), statistics.median(scratch)
    return {"context": context_len + new_tokens, "reuse_s": r, "recompute_s": s, "speedup": s / r}


def format_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return "\n".join(lines)
