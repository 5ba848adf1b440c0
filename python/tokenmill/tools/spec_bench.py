"""`tokenmill bench --speculative`: speculative decoding against plain decoding and against the
peers' own speculative modes, side by side in one run, greedy, on the same prompts (a benchmark,
never a test). Three scenarios:

1. input-grounded prompts (repeat, rewrite, extract from, continue a 400-800 token passage of real
   text or code): tokenmill prompt lookup vs plain (and, as engine tokenmill-int8, with int8 decode:
   llama.cpp's precision, where a verification row costs a third of an exact one); llama-cpp-python's
   LlamaPromptLookupDecoding vs its plain decoding; transformers' prompt_lookup_num_tokens vs its
   plain generate;
2. the default model converted to f16 as target, drafted for by its q4_0 and q8_0 copies and by the
   file's own weights, on open-ended chat prompts;
3. open-ended prompts where lookup finds little: the fallback must keep plain speed.

Decode tok/s is (new tokens - 1) / (time after the first new token): for tokenmill from its timings,
for the peers as the difference between generating N tokens and 1 token. Every speculative tokenmill
output is asserted equal to its plain greedy output."""

from __future__ import annotations

import statistics
import time
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

from ..api import Model, load
from ..generation import Generator, SpeculativeGenerator


def _passage(n_chars: int) -> str:
    return resources.files("tokenmill").joinpath("data/calibration_en.txt").read_text(encoding="utf-8")[:n_chars]


def _code() -> str:
    return resources.files("tokenmill").joinpath("text/chat.py").read_text(encoding="utf-8")


def grounded_prompts() -> list[tuple[str, str]]:
    """(name, user message) of the input-grounded scenario."""
    text = _passage(2200)
    return [
        ("repeat", "Repeat the following passage exactly, word for word:\n\n" + text[:1600]),
        ("rewrite-code", "Rewrite this Python module with the function render_chat renamed to render_template. "
                         "Output the whole module.\n\n" + _code()),
        ("extract", "From the passage below, copy every line spoken by MARULLUS.\n\n" + text),
        ("continue", "Continue this passage in the same style:\n\n" + text[:1800]),
    ]


OPEN_PROMPTS = [
    ("story", "Write a short story about a robot who learns to paint."),
    ("explain", "Explain how a refrigerator works to a ten-year-old."),
    ("advice", "Give me five tips for learning a new language."),
]


def _median_rate(samples: list[float]) -> float:
    return statistics.median(samples)


class _PlainAndSpec:
    """tokenmill, plain and speculative, on one prompt: decode tok/s and speculative statistics."""

    def __init__(self, target: Model, draft, new_tokens: int, spec_kw: dict):
        self.target, self.draft, self.new_tokens, self.spec_kw = target, draft, new_tokens, spec_kw

    def plain(self, ids: list[int]):
        gen = Generator(self.target, temperature=0, max_new_tokens=self.new_tokens, ignore_eos=True)
        out = gen.generate(ids)
        r = gen.last
        return out, (r.completion_tokens - 1) / r.decode_seconds

    def spec(self, ids: list[int]):
        gen = SpeculativeGenerator(self.target, self.draft, temperature=0, max_new_tokens=self.new_tokens,
                                   ignore_eos=True, **self.spec_kw)
        out = gen.generate(ids)
        r = gen.last
        return out, (r.completion_tokens - 1) / r.decode_seconds, r.speculative


class _LlamaCppLookup:
    """llama-cpp-python greedy decoding with and without LlamaPromptLookupDecoding."""

    def __init__(self, path: Path, threads: int, n_ctx: int):
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        common = dict(n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512, verbose=False)
        self.plain_llm = llama_cpp.Llama(str(path), **common)
        # logits_all=True by hand: with a draft model llama-cpp-python 0.3.36 computes every row's logits but
        # sizes its score buffer for logits_all as passed, and overflows it on prompts over n_batch
        self.lookup_llm = llama_cpp.Llama(str(path), draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10),
                                          logits_all=True, **common)

    @staticmethod
    def _time(llm, ids: list[int], n: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        for i, _ in enumerate(llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                            reset=True)):
            if i + 1 >= n:
                break
        return time.perf_counter() - t0

    def rate(self, ids: list[int], n: int, lookup: bool) -> float:
        llm = self.lookup_llm if lookup else self.plain_llm
        return (n - 1) / (self._time(llm, ids, n) - self._time(llm, ids, 1))


class _TransformersLookup:
    def __init__(self, path: Path, threads: int):
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32).eval()

    def _time(self, ids: list[int], n: int, lookup: bool) -> float:
        extra = dict(prompt_lookup_num_tokens=10) if lookup else {}
        with self.torch.no_grad():
            t0 = time.perf_counter()
            self.model.generate(self.torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, **extra)
            return time.perf_counter() - t0

    def rate(self, ids: list[int], n: int, lookup: bool) -> float:
        return (n - 1) / (self._time(ids, n, lookup) - self._time(ids, 1, lookup))


def _row(scenario, prompt, engine, plain, spec, stats=None, identical=None) -> dict:
    return {
        "scenario": scenario, "prompt": prompt, "engine": engine, "plain tok/s": plain, "spec tok/s": spec,
        "speedup": spec / plain,
        "accept": stats.acceptance_rate if stats else float("nan"),
        "mean k": statistics.mean(stats.k_per_step) if stats and stats.k_per_step else float("nan"),
        "identical": "yes" if identical else ("no" if identical is False else "-"),
    }


def run(path: Optional[Path] = None, threads: int = 2, new_tokens: int = 128, repeats: int = 3,
        engines=("tokenmill", "llama.cpp", "transformers"), scenarios=("grounded", "self-draft", "open"),
        log: Callable[[str], None] = print) -> list[dict]:
    from ..engine.default_model import resolve_default

    path = Path(path) if path else resolve_default()
    target = load(path, n_threads=threads)
    lookup_kw = dict(spec_k=8, spec_k_adaptive=True, spec_k_max=16, spec_disable_below_accept=0.3)
    rows: list[dict] = []
    peers = {}
    if "grounded" in scenarios:
        if "llama.cpp" in engines:
            try:
                peers["llama.cpp"] = _LlamaCppLookup(path, threads, 4096)
            except ImportError as exc:
                log(f"skipping llama.cpp: {exc}")
        if "transformers" in engines:
            try:
                peers["transformers"] = _TransformersLookup(path, threads)
            except ImportError as exc:
                log(f"skipping transformers: {exc}")
        benches = {"tokenmill": _PlainAndSpec(target, "lookup", new_tokens, lookup_kw)}
        if "tokenmill-int8" in engines:
            int8 = load(path, n_threads=threads, int8_decode=True)
            benches["tokenmill-int8"] = _PlainAndSpec(int8, "lookup", new_tokens, lookup_kw)
        for name, message in grounded_prompts():
            ids = target.chat_prompt([{"role": "user", "content": message}])
            rows += _compare("grounded", name, ids, benches, peers, new_tokens, repeats)
            log(_table(rows[-len(benches) - len(peers):]))
    if "self-draft" in scenarios:
        f16 = load(path, n_threads=threads, weights="f16")
        # q4_0 requantizes the file's Q4_1 weights (on SmolLM2 its greedy token agrees with the f16
        # copy's at 56 % of positions, teacher-forced); q8_0 at 97 %; the file's own weights, which
        # the f16 copy expands, at 100 %
        for label, weights in (("q4_0", "q4_0"), ("q8_0", "q8_0"), ("the file's weights", None)):
            draft = load(path, n_threads=threads, weights=weights)
            bench = _PlainAndSpec(f16, draft, new_tokens, dict(spec_k=4, spec_k_adaptive=True, spec_k_max=8))
            for name, message in OPEN_PROMPTS:
                ids = f16.chat_prompt([{"role": "user", "content": message}])
                rows += _compare(f"self-draft f16 <- {label}", name, ids, {"tokenmill": bench}, {}, new_tokens, repeats)
                log(_table(rows[-1:]))
    if "open" in scenarios:
        bench = _PlainAndSpec(target, "lookup", new_tokens, lookup_kw)
        for name, message in OPEN_PROMPTS:
            ids = target.chat_prompt([{"role": "user", "content": message}])
            rows += _compare("open (poor drafts)", name, ids, {"tokenmill": bench}, {}, new_tokens, repeats)
            log(_table(rows[-1:]))
    return rows


def _compare(scenario, name, ids, benches: dict, peers: dict, n: int, repeats: int) -> list[dict]:
    rates = {e: ([], []) for e in benches}
    stats = {}
    peer_rates = {p: ([], []) for p in peers}
    for _ in range(repeats):   # engines alternate within each repeat
        for engine, bench in benches.items():
            plain_out, plain_rate = bench.plain(ids)
            spec_out, spec_rate, stats[engine] = bench.spec(ids)
            assert spec_out == plain_out, f"{scenario}/{name}/{engine}: speculative output differs from greedy"
            rates[engine][0].append(plain_rate)
            rates[engine][1].append(spec_rate)
        for p, runner in peers.items():
            peer_rates[p][0].append(runner.rate(ids, n, lookup=False))
            peer_rates[p][1].append(runner.rate(ids, n, lookup=True))
    rows = [_row(scenario, name, e, _median_rate(plain), _median_rate(spec), stats[e], True)
            for e, (plain, spec) in rates.items()]
    for p, (plain, lookup) in peer_rates.items():
        rows.append(_row(scenario, name, p, _median_rate(plain), _median_rate(lookup)))
    return rows


def _table(rows: list[dict]) -> str:
    from .bench import format_table

    return format_table(rows)
