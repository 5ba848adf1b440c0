"""`tokenmill bench --rag`: retrieval quality and embedding speed on a task no one here wrote.

Queries are the first sentence of the docstring of public functions in a few Python standard-library
modules; each function's source without its docstring is its document. Recall@1 / @5 of MiniLM dense
retrieval (tokenmill's embeddings), BM25 (rank-bm25, if installed), and dense top-20 reranked by
query likelihood under the default decoder; embedding throughput (documents/s) of tokenmill against
sentence-transformers on torch CPU for the same model, in the same run."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
import time
from typing import Optional

import numpy as np

MODULES = ("json", "textwrap", "shutil", "os.path", "argparse", "tokenize", "csv", "string", "ast", "inspect",
           "functools", "calendar", "pathlib", "difflib", "statistics", "heapq", "bisect", "copy", "fnmatch", "glob",
           "gzip", "zipfile", "tarfile", "urllib.parse", "email.utils", "base64", "html", "random", "locale",
           "platform", "subprocess", "tempfile", "threading", "types", "typing", "warnings", "uuid", "dataclasses")
_WORD = re.compile(r"\w+")


def docstring_task(max_doc_chars: int = 2000) -> tuple[list[str], list[str]]:
    """(queries, documents), query i belonging to document i."""
    queries, docs = [], []
    seen = set()
    for name in MODULES:
        module = importlib.import_module(name)
        for attr, fn in sorted(vars(module).items()):
            if attr.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != module.__name__:
                continue
            doc = inspect.getdoc(fn)
            try:
                source = textwrap.dedent(inspect.getsource(fn))
            except (OSError, TypeError):
                continue
            if not doc:
                continue
            first = re.split(r"(?<=\.)\s", doc.strip().split("\n\n")[0].replace("\n", " "), maxsplit=1)[0]
            if len(first) < 20 or first in seen:
                continue
            tree = ast.parse(source)
            node = tree.body[0]
            first_stmt = node.body[0] if node.body else None
            if isinstance(first_stmt, ast.Expr) and isinstance(first_stmt.value, ast.Constant):   # the docstring
                node.body = node.body[1:] or [ast.Pass()]
            code = ast.unparse(tree)[:max_doc_chars]
            seen.add(first)
            queries.append(first)
            docs.append(code)
    return queries, docs


def _recall(ranked: list[list[int]], k: int) -> float:
    return float(np.mean([i in row[:k] for i, row in enumerate(ranked)]))


def _dense_ranking(doc_vecs: np.ndarray, query_vecs: np.ndarray, k: int) -> list[list[int]]:
    from ..rag import Index

    index = Index()
    index.add(list(range(len(doc_vecs))), doc_vecs)
    return [[h[0] for h in row] for row in index.search(query_vecs, k=k)]


def run(embedder_dir: str, decoder_path: Optional[str], threads: int, rerank_depth: int = 20,
        rerank_queries: Optional[int] = None, repeats: int = 3) -> list[dict]:
    """Recall of each method, and embedding speed: tokenmill exact, tokenmill with q8_0 weights and
    int8 activations (llama.cpp's trade for a Q8_0 embedding GGUF), sentence-transformers -- each
    embedding every document `repeats` times, the three alternating, medians reported."""
    from ..api import load
    from ..rag import rerank

    queries, docs = docstring_task()
    out = []
    encoders = {"exact": load(embedder_dir, n_threads=threads),
                "q8_0 + int8": load(embedder_dir, n_threads=threads, weights="q8_0", int8_prefill=True)}
    embed = {name: enc.embed for name, enc in encoders.items()}
    try:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        st = SentenceTransformer(str(embedder_dir), device="cpu")
        embed["sentence-transformers"] = lambda texts: st.encode(texts, batch_size=32, convert_to_numpy=True,
                                                                 normalize_embeddings=True)
    except ImportError:
        pass
    seconds = {name: [] for name in embed}
    vecs = {}
    for name, fn in embed.items():
        fn(docs[:8])   # warm
    for _ in range(repeats):
        for name, fn in embed.items():
            t = time.perf_counter()
            vecs[name] = fn(docs)
            seconds[name].append(time.perf_counter() - t)
    doc_vecs = vecs["exact"]
    k = max(rerank_depth, 5)
    dense = _dense_ranking(doc_vecs, embed["exact"](queries), k)
    out.append(dict(method="MiniLM dense (tokenmill)", queries=len(queries), recall_at_1=_recall(dense, 1),
                    recall_at_5=_recall(dense, 5), note=f"{len(docs)} documents"))
    fast = _dense_ranking(vecs["q8_0 + int8"], embed["q8_0 + int8"](queries), k)
    cosine = float((vecs["q8_0 + int8"] * doc_vecs).sum(axis=1).min())
    out.append(dict(method="MiniLM dense (tokenmill, q8_0 weights + int8_prefill)", queries=len(queries),
                    recall_at_1=_recall(fast, 1), recall_at_5=_recall(fast, 5),
                    note=f"lowest cosine to the exact document vectors {cosine:.5f}"))
    try:
        from rank_bm25 import BM25Okapi

        bm25 = BM25Okapi([_WORD.findall(d.lower()) for d in docs])
        ranked = [list(np.argsort(-bm25.get_scores(_WORD.findall(q.lower())), kind="stable")[:5]) for q in queries]
        out.append(dict(method="BM25 (rank-bm25)", queries=len(queries), recall_at_1=_recall(ranked, 1),
                        recall_at_5=_recall(ranked, 5), note=""))
    except ImportError:
        pass
    n_rr = min(rerank_queries or len(queries), len(queries))
    if decoder_path is not False:
        dec = load(decoder_path, n_threads=threads)
        t = time.perf_counter()
        reranked = []
        for i in range(n_rr):
            cands = dense[i][:rerank_depth]
            order = rerank(dec, queries[i], [docs[j][:1200] for j in cands])
            reranked.append([cands[j] for j, _ in order])
        rr_s = time.perf_counter() - t
        out.append(dict(method=f"dense top-{rerank_depth} + SmolLM2 query-likelihood rerank", queries=n_rr,
                        recall_at_1=_recall(reranked, 1), recall_at_5=_recall(reranked, 5),
                        note=f"dense on the same queries: R@1 {_recall(dense[:n_rr], 1):.3f}, R@5 "
                             f"{_recall(dense[:n_rr], 5):.3f}; {rr_s / n_rr:.2f} s/query"))
    rates = {name: len(docs) / float(np.median(s)) for name, s in seconds.items()}
    speed = ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items())
    st_rate = rates.get("sentence-transformers")
    if st_rate:
        diff = float(np.abs(vecs["sentence-transformers"] - doc_vecs).max())
        speed += (f" docs/s: exact {rates['exact'] / st_rate:.2f}x, q8_0 + int8 {rates['q8_0 + int8'] / st_rate:.2f}x "
                  f"sentence-transformers; exact vs sentence-transformers max |difference| {diff:.1e}")
    else:
        speed += " docs/s (sentence-transformers not installed)"
    out.append(dict(method="embedding speed", queries="", recall_at_1="", recall_at_5="",
                    note=f"{speed}; medians of {repeats} alternating runs"))
    return out


def run_compression(decoder_path: Optional[str], threads: int, n_examples: int = 30, n_docs: int = 4,
                    rates=(0.5, 0.33)) -> list[dict]:
    """compress_prompt on the docstring task: the context is the gold function's source among n_docs - 1
    others, the question asks what the function does, and the gold span is its docstring's first
    sentence (written by the stdlib's authors). Reported: kept-token ratio, prompt tokens/time of the
    answer's prefill against the full context (compression time included), and the gold span's mean
    NLL under no context, the full context and each rate."""
    from ..api import load
    from ..rag import compress_prompt
    from ..rag.rerank import log_softmax_at

    queries, docs = docstring_task()
    model = load(decoder_path, n_threads=threads)
    rng = np.random.default_rng(0)
    picks = rng.choice(len(docs), size=min(n_examples, len(docs)), replace=False)

    def gold_nll(context: str, name: str, gold: str) -> tuple[float, float, int]:
        prefix = model.tokenize((context + "\n\n" if context else "") + f"In one sentence, the function {name}: ")
        target = model.tokenize(gold, add_special_tokens=False)
        cache = model.new_cache(len(prefix) + len(target))
        t = time.perf_counter()
        logits = model.eval(cache, prefix + target, logits=list(range(len(prefix) - 1, len(prefix) + len(target) - 1))).logits
        seconds = time.perf_counter() - t
        return float(-log_softmax_at(logits, np.array(target)).mean()), seconds, len(prefix)

    rows = {key: {"nll": [], "seconds": [], "tokens": [], "compress": []} for key in ("none", "full", *rates)}
    for i in picks:
        name = re.match(r"def (\w+)", docs[i]).group(1) if docs[i].startswith("def ") else "it"
        others = [j for j in rng.choice(len(docs), size=n_docs + 2, replace=False) if j != i][: n_docs - 1]
        context_docs = [docs[j][:800] for j in [i, *others]]
        rng.shuffle(context_docs)
        question = f"What does the function {name} do?"
        for key in rows:
            t = time.perf_counter()
            if key == "none":
                context = ""
            elif key == "full":
                context = "\n\n".join(context_docs)
            else:
                context = compress_prompt(model, context_docs, question, rate=key).text
            spent = time.perf_counter() - t
            nll, seconds, tokens = gold_nll(context, name, queries[i])
            for field_name, value in (("nll", nll), ("seconds", seconds), ("tokens", tokens), ("compress", spent)):
                rows[key][field_name].append(value)
    full = rows["full"]
    out = []
    for key, r in rows.items():
        out.append(dict(context=f"rate {key}" if isinstance(key, float) else key, examples=len(picks),
                        prompt_tokens=float(np.mean(r["tokens"])),
                        prompt_vs_full=float(np.mean(r["tokens"]) / np.mean(full["tokens"])),
                        prefill_s=float(np.mean(r["seconds"])), compress_s=float(np.mean(r["compress"])),
                        gold_nll=float(np.mean(r["nll"]))))
    return out
