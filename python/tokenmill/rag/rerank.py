"""Reranking with any decoder, no trained reranker: a document's score is the mean log-probability
of the question's tokens following it (query likelihood; the document is truncated to leave the
question room in the context). method="lingua" appends LongLLMLingua's restrictive statement to the
question ("We can get the answer to this question in the given documents."), its coarse ranking.
Documents go through the model together, up to `batch_tokens` rows per forward pass."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from ..errors import ContextOverflowError, InvalidArgumentError

if TYPE_CHECKING:
    from ..engine.model import EngineModel

METHODS = ("query_likelihood", "lingua")
LINGUA_STATEMENT = " We can get the answer to this question in the given documents."


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log softmax(logits[i])[targets[i]] for every row i (float64 sums)."""
    top = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - top, dtype=np.float64).sum(axis=1)) + top[:, 0]
    return logits[np.arange(len(targets)), targets] - lse


def score_documents(model: "EngineModel", question: str, documents: Sequence[str], method: str = "query_likelihood",
                    batch_tokens: int = 2048) -> np.ndarray:
    """Mean log p(question tokens | document) for every document, float64 [len(documents)]."""
    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not isinstance(question, str) or not question.strip():
        raise InvalidArgumentError("the question must be a non-empty string")
    if isinstance(documents, str) or not isinstance(documents, Sequence) or not documents:
        raise InvalidArgumentError("documents must be a non-empty list of strings")
    q = model.tokenize(" " + question.strip() + (LINGUA_STATEMENT if method == "lingua" else ""), add_special_tokens=False)
    room = model.n_ctx - len(q)
    if room < 2:
        raise ContextOverflowError(f"the question takes {len(q)} tokens of a {model.n_ctx}-token context")
    seqs = []
    for i, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise InvalidArgumentError(f"documents[{i}] is a {type(doc).__name__}, not a string")
        prefix = model.tokenize(doc + "\n\nQuestion:")[-room:]
        seqs.append((prefix, prefix + q))
    scores = np.empty(len(seqs))
    start = 0
    while start < len(seqs):
        end, rows = start, 0
        while end < len(seqs) and (end == start or rows + len(seqs[end][1]) <= batch_tokens):
            rows += len(seqs[end][1])
            end += 1
        batch = seqs[start:end]
        logit_rows, offset = [], 0
        for prefix, full in batch:   # the rows that predict the question's tokens
            logit_rows.extend(range(offset + len(prefix) - 1, offset + len(full) - 1))
            offset += len(full)
        caches = [model.new_cache(len(full)) for _, full in batch]
        logits = model.eval_batch(caches, [full for _, full in batch], logits=logit_rows).logits
        targets = np.array([t for _ in batch for t in q])
        logp = log_softmax_at(logits, targets).reshape(len(batch), len(q))
        scores[start:end] = logp.mean(axis=1)
        start = end
    return scores


def rerank(model: "EngineModel", question: str, documents: Sequence[str], top_k: Optional[int] = None,
           method: str = "query_likelihood", batch_tokens: int = 2048) -> list[tuple[int, float]]:
    """(document index, score) best first, the top_k of them (all by default)."""
    scores = score_documents(model, question, documents, method, batch_tokens)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return [(i, float(scores[i])) for i in order[:top_k]]
