"""`tokenmill perplexity MODEL --text FILE [--ctx 512] [--kl-base BASE] [--kv-kind K]`: what
llama-perplexity measures. The text's tokens are cut into windows of ctx tokens (a BOS first where the
model's tokenizer adds one); each window runs alone in a fresh cache and its second half is scored
(every scored token sees at least ctx/2 tokens before it, as llama.cpp's perplexity does). Against a
base model on the same windows: the mean KL divergence KL(base || model) per scored token, its 99th
percentile, and how often the two agree on the most likely token — what a weight type or a KV kind costs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..engine.cache import CacheSpec
from ..generation.cache_plan import log_softmax
from ..errors import InvalidArgumentError


@dataclass
class PerplexityReport:
    perplexity: float
    windows: int
    scored_tokens: int
    base_perplexity: Optional[float] = None
    mean_kl: Optional[float] = None
    p99_kl: Optional[float] = None
    top1_agreement: Optional[float] = None

    def rows(self) -> list:
        out = [{"metric": "perplexity", "value": self.perplexity}]
        if self.mean_kl is not None:
            out += [{"metric": "base perplexity", "value": self.base_perplexity},
                    {"metric": "mean KL(base || model)", "value": self.mean_kl},
                    {"metric": "99th percentile KL", "value": self.p99_kl},
                    {"metric": "top-1 agreement", "value": self.top1_agreement}]
        per_window = self.scored_tokens // max(self.windows, 1)
        return out + [{"metric": "windows x scored tokens", "value": f"{self.windows} x {per_window}"}]


def _windows(model, text: str, ctx: int, max_windows: Optional[int]) -> list:
    tok = model.tokenizer
    ids = model.tokenize(text, add_special_tokens=False)
    bos = [tok.bos_id] if tok is not None and tok.bos_id is not None and model.tokenize("", add_special_tokens=True) else []
    step = ctx - len(bos)
    wins = [bos + ids[i:i + step] for i in range(0, len(ids) - step + 1, step)]
    if not wins:
        raise InvalidArgumentError(f"the text has {len(ids)} tokens: fewer than one window of {ctx}")
    return wins[:max_windows] if max_windows else wins


def _window_logp(model, ids: list, spec: CacheSpec) -> np.ndarray:
    """log-probabilities [len(ids) - 1, vocab] of each next token of a window."""
    return log_softmax(model.eval(model.new_cache(len(ids), spec), ids, logits="all").logits[:-1])


def perplexity(model, text: str, ctx: int = 512, base=None, kv_kind: str = "fp32",
               max_windows: Optional[int] = None) -> PerplexityReport:
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 8 or ctx > model.n_ctx:
        raise InvalidArgumentError(f"ctx must be an integer in [8, {model.n_ctx}], got {ctx!r}")
    if base is not None and base.n_vocab != model.n_vocab:
        raise InvalidArgumentError(f"the base model has {base.n_vocab} tokens, the model {model.n_vocab}")
    spec = CacheSpec(kv_kind, kv_kind)
    nll, base_nll, kls, agree, n = 0.0, 0.0, [], 0, 0
    windows = _windows(model, text, ctx, max_windows)
    first = ctx // 2
    for ids in windows:
        targets = np.asarray(ids[1:])[first - 1:]
        logp = _window_logp(model, ids, spec)[first - 1:]
        nll -= logp[np.arange(len(targets)), targets].sum()
        n += len(targets)
        if base is not None:
            ref = _window_logp(base, ids, CacheSpec())[first - 1:]
            base_nll -= ref[np.arange(len(targets)), targets].sum()
            kls.append((np.exp(ref) * (ref - logp)).sum(axis=-1))
            agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
    report = PerplexityReport(float(np.exp(nll / n)), len(windows), n)
    if base is not None:
        kl = np.concatenate(kls)
        report.base_perplexity = float(np.exp(base_nll / n))
        report.mean_kl, report.p99_kl = float(kl.mean()), float(np.percentile(kl, 99))
        report.top1_agreement = agree / n
    return report


def run(args) -> PerplexityReport:
    from ..api import load

    model = load(args.model, n_threads=args.threads, weights=args.weights)
    base = load(args.kl_base, n_threads=args.threads) if args.kl_base else None
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    return perplexity(model, text, ctx=args.ctx, base=base, kv_kind=args.kv_kind, max_windows=args.max_windows)
