"""Training-free prompt compression in the manner of LongLLMLingua, with any small causal model:

1. documents ranked by question likelihood under the model with LongLLMLingua's restrictive statement
   (rerank(method="lingua")); the least relevant are dropped whole while what remains still exceeds
   the token budget (rate x the context's tokens), and the rest are put in rank order;
2. the kept documents' tokens scored in one teacher-forced pass (the KV cache carried from chunk to
   chunk, so the whole context is one pass, not one per token): "ppl" keeps the most surprising tokens,
   -log p(x_i | x_<i); "contrastive" (default) LongLLMLingua's contrastive perplexity
   p(x_i | x_<i)^-1 - p(x_i | question, x_<i)^-1, which needs a second pass with the question in front,
   favouring tokens the question makes predictable;
3. the top-scoring tokens up to the budget are kept in their original order (each document's first
   token always), and the text is those tokens decoded, documents separated by blank lines.

    out = compress_prompt(model, docs, question, rate=0.5)
    out.text, out.stats   # original / kept tokens, ratio, documents kept (in order), seconds"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..errors import InvalidArgumentError
from .rerank import log_softmax_at, score_documents

if TYPE_CHECKING:
    from ..engine.model import EngineModel

METHODS = ("contrastive", "ppl")
CHUNK = 256   # tokens per forward pass (logits for all of them at once)


@dataclass
class CompressedPrompt:
    text: str                    # the kept documents' pieces, joined by blank lines
    kept_ids: list[int]
    stats: dict = field(default_factory=dict)
    pieces: list[str] = field(default_factory=list)   # one per kept document, in stats["documents_kept"] order


def token_logprobs(model: "EngineModel", prefix: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
    """log p(tokens[i] | prefix, tokens[:i]) for every i, in chunks of CHUNK tokens on one cache;
    token 0 with no prefix gets 0 (nothing to predict it from)."""
    ids = list(prefix) + list(tokens)
    cache = model.new_cache(len(ids))
    out = np.zeros(len(ids))
    for start in range(0, len(ids), CHUNK):
        piece = ids[start:start + CHUNK]
        logits = model.eval(cache, piece, logits="all").logits           # predicts ids[start + 1 .. start + len]
        nxt = np.array(ids[start + 1:start + len(piece) + 1])
        out[start + 1:start + 1 + len(nxt)] = log_softmax_at(logits[:len(nxt)], nxt)
    return out[len(prefix):]


def compress_prompt(model: "EngineModel", context_docs: Sequence[str], question: str, rate: float = 0.5,
                    method: str = "contrastive", rank_documents: bool = True) -> CompressedPrompt:
    """Compresses context_docs to about rate x their tokens for answering question (module docstring)."""
    t0 = time.perf_counter()
    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise InvalidArgumentError(f"rate must be in (0, 1], got {rate!r}")
    if isinstance(context_docs, str) or not isinstance(context_docs, Sequence) or not context_docs:
        raise InvalidArgumentError("context_docs must be a non-empty list of strings")
    if not all(isinstance(d, str) for d in context_docs):
        raise InvalidArgumentError("every document must be a string")
    if not isinstance(question, str) or not question.strip():
        raise InvalidArgumentError("the question must be a non-empty string")
    docs = [model.tokenize(d, add_special_tokens=False) for d in context_docs]
    total = sum(map(len, docs))
    budget = max(1, round(rate * total))
    order = list(range(len(docs)))
    if rank_documents and len(docs) > 1:
        scores = score_documents(model, question, context_docs, method="lingua")
        order = sorted(order, key=lambda i: (-scores[i], i))
        while len(order) > 1 and sum(len(docs[i]) for i in order[:-1]) >= budget:
            order.pop()                                    # the least relevant document, whole
    kept_docs = [i for i in order if docs[i]]
    context = [t for i in kept_docs for t in docs[i]]
    starts = np.cumsum([0] + [len(docs[i]) for i in kept_docs])[:-1]
    bos = [model.tokenizer.bos_id] if model.tokenizer.bos_id is not None else []
    plain = token_logprobs(model, bos, context)
    if method == "ppl":
        importance = -plain
    else:
        q = model.tokenize(question.strip() + "\n\n", add_special_tokens=False)
        with_question = token_logprobs(model, bos + q, context)
        importance = np.exp(np.minimum(-plain, 50.0)) - np.exp(np.minimum(-with_question, 50.0))
    importance[starts] = np.inf                            # each document keeps its first token
    keep = np.zeros(len(context), bool)
    keep[np.argsort(-importance, kind="stable")[:min(budget, len(context))]] = True
    pieces, kept_ids = [], []
    for doc_index, start in zip(kept_docs, starts):
        ids = [t for t, k in zip(context[start:start + len(docs[doc_index])], keep[start:start + len(docs[doc_index])]) if k]
        kept_ids.extend(ids)
        pieces.append(model.detokenize(ids).strip())
    stats = {"original_tokens": total, "kept_tokens": len(kept_ids), "ratio": len(kept_ids) / total if total else 1.0,
             "documents_kept": kept_docs, "seconds": time.perf_counter() - t0,
             "forward_tokens": len(context) * (1 if method == "ppl" else 2)}
    return CompressedPrompt("\n\n".join(pieces), kept_ids, stats, pieces)
