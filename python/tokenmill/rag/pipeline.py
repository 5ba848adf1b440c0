"""`Pipeline`: documents in, answers out — chunk and embed the documents into an Index, retrieve the
top_k chunks for a question (optionally reranked by the generator's query likelihood), and answer
with the generator through its chat template, citing the chunks it was given.

    rag = Pipeline(tokenmill.load(), embedder=tokenmill.load("all-MiniLM-L6-v2/"), top_k=4)
    rag.add_documents({"faq": open("faq.txt").read(), ...})      # or a list of texts, a folder, a .jsonl
    answer = rag.ask("How do I reset my password?")
    answer.text, answer.sources                                   # [(chunk id, score)], best first

Chunk ids are "<document id>#<n>". With no embedder the generator embeds (mean of its final hidden
states): it works, but an encoder trained for retrieval finds far better chunks."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ..errors import ContextOverflowError, InvalidArgumentError
from .clara import Clara
from .index import Index, chunk_text
from .rerank import rerank

SYSTEM_PROMPT = ("Answer the question using only the numbered documents. Be brief. If the documents do not "
                 "contain the answer, say so.")
DOC_SUFFIXES = (".txt", ".md", ".rst")


@dataclass
class Answer:
    text: str
    sources: list[tuple[str, float]]          # the chunks given to the generator, best first
    timings: dict = field(default_factory=dict)   # seconds: retrieve, rerank, generate


def read_documents(source: Union[str, Path]) -> dict[str, str]:
    """{id: text} from a folder of .txt/.md/.rst files (ids: relative paths) or a JSONL file of
    {"id": ..., "text": ...} objects (ids: the id field, else the line number)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES)
        if not files:
            raise InvalidArgumentError(f"{path} holds no {', '.join(DOC_SUFFIXES)} files")
        return {str(p.relative_to(path)): p.read_text(encoding="utf-8", errors="replace") for p in files}
    if path.is_file() and path.suffix.lower() in (".jsonl", ".ndjson"):
        docs = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgumentError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise InvalidArgumentError(f"{path}:{number}: expected an object with a 'text' string")
            docs[str(row.get("id", number))] = row["text"]
        return docs
    if path.is_file():
        return {path.name: path.read_text(encoding="utf-8", errors="replace")}
    raise FileNotFoundError(f"no such file or folder: {path}")


COMPRESSIONS = ("none", "lingua", "clara")


class Pipeline:
    """Retrieval-augmented generation over one Index (module docstring). `rerank_depth` > 0 reranks
    that many retrieved chunks by query likelihood under the generator before keeping top_k.
    compression="lingua" shortens the retrieved chunks to `rate` of their tokens with compress_prompt
    (scored by `compressor`, default the generator) before the generator reads them; compression="clara"
    takes a tokenmill.rag.Clara as the generator, which reads the chunks as its compressed vectors
    (cached on disk when the Clara has a cache_dir)."""

    def __init__(self, generator, embedder=None, top_k: int = 4, chunk_tokens: int = 200, overlap: int = 32,
                 rerank_depth: int = 0, index: Optional[Index] = None, max_new_tokens: int = 256,
                 system_prompt: str = SYSTEM_PROMPT, progress: Optional[bool] = None, compression: str = "none",
                 rate: float = 0.5, compressor=None):
        if compression not in COMPRESSIONS:
            raise InvalidArgumentError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
        self.clara = None
        if compression == "clara":
            if not isinstance(generator, Clara):
                raise InvalidArgumentError("compression='clara' needs a tokenmill.rag.Clara as the generator (Clara.load)")
            self.clara, generator = generator, generator.model
        elif isinstance(generator, Clara):
            raise InvalidArgumentError("a Clara generator needs compression='clara'")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise InvalidArgumentError(f"rate must be in (0, 1], got {rate!r}")
        self.compression, self.rate = compression, rate
        self.compressor = compressor if compressor is not None else generator
        for name, value, lo in (("top_k", top_k, 1), ("chunk_tokens", chunk_tokens, 8), ("overlap", overlap, 0),
                                ("rerank_depth", rerank_depth, 0), ("max_new_tokens", max_new_tokens, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise InvalidArgumentError(f"{name} must be an integer >= {lo}, got {value!r}")
        self.generator = generator
        self.embedder = embedder if embedder is not None else generator
        self.top_k, self.chunk_tokens, self.overlap, self.rerank_depth = top_k, chunk_tokens, overlap, rerank_depth
        self.max_new_tokens, self.system_prompt = max_new_tokens, system_prompt
        self.index = index if index is not None else Index()
        if len(self.index) and self.index.dim != self.embedder.n_embd:
            raise InvalidArgumentError(f"the index holds {self.index.dim}-dimensional vectors but the embedder makes "
                                       f"{self.embedder.n_embd}-dimensional ones")
        self.progress = progress

    def add_documents(self, documents: Union[Mapping[str, str], Sequence[str], str, Path], batch: int = 64) -> int:
        """Chunks, embeds and indexes documents ({id: text}, a list of texts — ids "0", "1", … — or a
        folder / .jsonl file, see read_documents); returns the number of chunks added."""
        if isinstance(documents, (str, Path)):
            documents = read_documents(documents)
        elif not isinstance(documents, Mapping):
            if not isinstance(documents, Sequence):
                raise InvalidArgumentError("documents must be a {id: text} mapping, a list of texts, or a path")
            documents = {str(i): t for i, t in enumerate(documents)}
        ids, texts = [], []
        for doc_id, text in documents.items():
            if not isinstance(text, str):
                raise InvalidArgumentError(f"document {doc_id!r} is a {type(text).__name__}, not a string")
            for n, piece in enumerate(chunk_text(self.embedder.tokenizer, text, self.chunk_tokens, self.overlap)):
                ids.append(f"{doc_id}#{n}")
                texts.append(piece)
        bar = None
        if (self.progress is None and sys.stderr.isatty()) or self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(texts), unit="chunk", desc="indexing", file=sys.stderr)
        for start in range(0, len(texts), batch):
            part = texts[start:start + batch]
            self.index.add(ids[start:start + batch], self.embedder.embed(part), texts=part)
            if bar is not None:
                bar.update(len(part))
        if bar is not None:
            bar.close()
        return len(texts)

    def retrieve(self, question: str) -> tuple[list[tuple[str, float]], dict]:
        if not isinstance(question, str) or not question.strip():
            raise InvalidArgumentError("the question must be a non-empty string")
        if not len(self.index):
            raise InvalidArgumentError("the index is empty: add_documents() first")
        t0 = time.perf_counter()
        hits = self.index.search(self.embedder.embed([question]), k=max(self.top_k, self.rerank_depth))[0]
        timings = {"retrieve": time.perf_counter() - t0}
        if self.rerank_depth:
            t1 = time.perf_counter()
            order = rerank(self.generator, question, [self.index.text(i) for i, _ in hits], top_k=self.top_k)
            hits = [(hits[i][0], score) for i, score in order]
            timings["rerank"] = time.perf_counter() - t1
        return hits[: self.top_k], timings

    def prompt(self, question: str, sources: Sequence[tuple[str, Any]], texts: Optional[Sequence[str]] = None) -> list[int]:
        texts = texts if texts is not None else [self.index.text(doc_id) for doc_id, _ in sources]
        docs = "\n\n".join(f"[{n}] {text}" for n, text in enumerate(texts, 1))
        user = f"Documents:\n{docs}\n\nQuestion: {question.strip()}"
        tok = self.generator.tokenizer
        if tok is not None and tok.chat_template:
            return self.generator.chat_prompt([{"role": "system", "content": self.system_prompt},
                                               {"role": "user", "content": user}])
        return self.generator.tokenize(f"{self.system_prompt}\n\n{user}\nAnswer:")

    def ask(self, question: str, **generate_kwargs: Any) -> Answer:
        """Retrieves, builds the prompt and generates (greedy unless generate_kwargs say otherwise);
        fewer chunks are given when all top_k would not fit the context."""
        sources, timings = self.retrieve(question)
        if self.clara is not None:
            t = time.perf_counter()
            max_new = generate_kwargs.pop("max_new_tokens", self.max_new_tokens)
            if generate_kwargs:
                raise InvalidArgumentError(f"CLaRa decodes greedily; {', '.join(generate_kwargs)} do not apply")
            text = self.clara.generate_from_text([question], [[self.index.text(i) for i, _ in sources]], max_new)[0]
            timings["generate"] = time.perf_counter() - t
            return Answer(text.strip(), sources, timings)
        budget = self.generator.n_ctx - self.max_new_tokens

        def build(chosen):
            texts = None
            if self.compression == "lingua":
                from .compress import compress_prompt

                t = time.perf_counter()
                out = compress_prompt(self.compressor, [self.index.text(i) for i, _ in chosen], question, rate=self.rate)
                timings["compress"] = time.perf_counter() - t
                kept = out.stats["documents_kept"]
                chosen, texts = [chosen[i] for i in kept], out.pieces
            return chosen, self.prompt(question, chosen, texts)

        sources, ids = build(sources)
        while len(ids) > budget and len(sources) > 1:
            sources, ids = build(sources[:-1])
        if len(ids) > budget:
            raise ContextOverflowError(f"the question and one chunk take {len(ids)} tokens; the context leaves "
                                       f"{budget} before max_new_tokens={self.max_new_tokens}")
        t = time.perf_counter()
        text = self.generator.generate(ids, self.max_new_tokens, **{"temperature": 0.0, **generate_kwargs})
        timings["generate"] = time.perf_counter() - t
        return Answer(text.strip(), sources, timings)
