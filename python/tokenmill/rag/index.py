"""`Index`: documents (id, text, embedding) searched by exact cosine similarity, top-k per query,
scored in blocks so memory stays bounded; saved as `vectors.safetensors` + `index.json` (no pickle)
and loaded back; documents can be added at any time.

    index = Index(dim=384)
    index.add(["a", "b"], vectors, texts=["first text", "second text"])
    hits = index.search(query_vectors, k=5)     # per query: [(id, score), ...], best first
    index.save("my-index/"); Index.load("my-index/")"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..errors import InvalidArgumentError, ModelFormatError, NumericalError

FORMAT = "tokenmill-index-1"
BLOCK_ROWS = 65536   # documents scored per block


def _unit_rows(vectors, dim: Optional[int], what: str) -> np.ndarray:
    try:
        arr = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what} must be a numeric array [n, dim]") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InvalidArgumentError(f"{what} must be a 2-D array [n, dim], got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise InvalidArgumentError(f"{what} have dimension {arr.shape[1]} but the index holds dimension {dim} "
                                   "(a different embedder?)")
    if not np.isfinite(arr).all():
        raise NumericalError(f"{what} contain NaN or infinity")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InvalidArgumentError(f"{what} contain an all-zero vector, which has no direction")
    return arr / norms


class Index:
    """Exact cosine search over documents (module docstring). ids are strings or integers, unique."""

    def __init__(self, dim: Optional[int] = None):
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise InvalidArgumentError(f"dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self.ids: list = []
        self.texts: list[Optional[str]] = []
        self.metadata: list[Optional[dict]] = []
        self._blocks: list[np.ndarray] = []   # unit rows, appended per add()
        self._matrix: Optional[np.ndarray] = None
        self._where: dict = {}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def vectors(self) -> np.ndarray:
        """The unit-length document vectors [n, dim]."""
        if self._matrix is None:
            self._matrix = np.concatenate(self._blocks) if self._blocks else np.zeros((0, self.dim or 0), np.float32)
            self._blocks = [self._matrix] if self._blocks else []
        return self._matrix

    def add(self, ids: Sequence, embeddings, texts: Optional[Sequence[Optional[str]]] = None,
            metadata: Optional[Sequence[Optional[dict]]] = None) -> None:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise InvalidArgumentError("ids must be a list of strings or integers")
        self._append(ids, _unit_rows(embeddings, self.dim, "embeddings"), texts, metadata)

    def _append(self, ids: Sequence, rows: np.ndarray, texts, metadata) -> None:
        n = len(ids)
        if rows.shape[0] != n:
            raise InvalidArgumentError(f"{n} ids for {rows.shape[0]} embeddings")
        for name, values in (("texts", texts), ("metadata", metadata)):
            if values is not None and len(values) != n:
                raise InvalidArgumentError(f"{len(values)} {name} for {n} ids")
        seen = set()
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, (str, int)):
                raise InvalidArgumentError(f"document id {i!r} must be a string or an integer")
            if i in self._where or i in seen:
                raise InvalidArgumentError(f"document id {i!r} is already in the index")
            seen.add(i)
        for i, t in enumerate(texts or ()):
            if t is not None and not isinstance(t, str):
                raise InvalidArgumentError(f"texts[{i}] must be a string or None")
        self.dim = rows.shape[1]
        for i in ids:
            self._where[i] = len(self.ids)
            self.ids.append(i)
        self.texts.extend(texts if texts is not None else [None] * n)
        self.metadata.extend(metadata if metadata is not None else [None] * n)
        self._blocks.append(rows)
        self._matrix = None

    def text(self, doc_id) -> Optional[str]:
        if doc_id not in self._where:
            raise KeyError(doc_id)
        return self.texts[self._where[doc_id]]

    def search(self, queries, k: int = 5) -> list[list[tuple[Any, float]]]:
        """Per query vector, the k most similar documents as (id, cosine), best first (ties: the
        earlier document first)."""
        if not self.ids:
            raise InvalidArgumentError("the index is empty: add documents before searching")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidArgumentError(f"k must be a positive integer, got {k!r}")
        q = _unit_rows(queries, self.dim, "query vectors")
        k = min(k, len(self.ids))
        best_scores = np.full((q.shape[0], 0), -np.inf, np.float32)
        best_rows = np.zeros((q.shape[0], 0), np.int64)
        matrix = self.vectors
        for start in range(0, matrix.shape[0], BLOCK_ROWS):
            scores = q @ matrix[start:start + BLOCK_ROWS].T                       # [q, block]
            scores = np.concatenate([best_scores, scores], axis=1)
            rows = np.concatenate([best_rows, np.broadcast_to(np.arange(start, start + scores.shape[1] - best_rows.shape[1]),
                                                              (q.shape[0], scores.shape[1] - best_rows.shape[1]))], axis=1)
            order = np.lexsort((rows, -scores), axis=1)[:, :k]                    # by score, then by document
            best_scores = np.take_along_axis(scores, order, axis=1)
            best_rows = np.take_along_axis(rows, order, axis=1)
        return [[(self.ids[r], float(s)) for r, s in zip(rr, ss)] for rr, ss in zip(best_rows, best_scores)]

    # ---- files
    def save(self, directory: Union[str, Path]) -> None:
        from safetensors.numpy import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({"vectors": np.ascontiguousarray(self.vectors)}, str(d / "vectors.safetensors"))
        doc = {"format": FORMAT, "dim": self.dim, "ids": self.ids, "texts": self.texts, "metadata": self.metadata}
        tmp = d / "index.json.tmp"
        tmp.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
        tmp.replace(d / "index.json")

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "Index":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        d = Path(directory)
        for name in ("index.json", "vectors.safetensors"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d} has no {name}: not a saved tokenmill Index")
        try:
            doc = json.loads((d / "index.json").read_text(encoding="utf-8"))
            vectors = load_file(str(d / "vectors.safetensors"))["vectors"]
        except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, KeyError) as exc:
            raise ModelFormatError(f"{d}: a damaged index ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ModelFormatError(f"{d}/index.json is not a {FORMAT} file")
        ids, texts, meta = doc.get("ids"), doc.get("texts"), doc.get("metadata")
        if not all(isinstance(v, list) and len(v) == len(ids or []) for v in (ids, texts, meta)) or \
                vectors.ndim != 2 or vectors.shape[0] != len(ids) or vectors.dtype != np.float32:
            raise ModelFormatError(f"{d}: ids, texts, metadata and vectors disagree")
        index = cls(doc.get("dim"))
        if ids:
            if not np.isfinite(vectors).all():
                raise ModelFormatError(f"{d}/vectors.safetensors holds NaN or infinity")
            index._append(ids, vectors, texts, meta)   # saved unit rows stay bit for bit
        return index


def chunk_text(tokenizer, text: str, chunk_tokens: int = 256, overlap: int = 32) -> list[str]:
    """text cut into pieces of at most chunk_tokens tokens, each starting `overlap` tokens before the
    previous one ended; pieces are exact substrings of text (cut at token boundaries)."""
    if not isinstance(text, str):
        raise InvalidArgumentError("text must be a string")
    for name, value, lo in (("chunk_tokens", chunk_tokens, 1), ("overlap", overlap, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise InvalidArgumentError(f"{name} must be an integer >= {lo}, got {value!r}")
    if overlap >= chunk_tokens:
        raise InvalidArgumentError(f"overlap ({overlap}) must be smaller than chunk_tokens ({chunk_tokens})")
    hf = getattr(tokenizer, "hf", tokenizer)
    offsets = [o for o in hf.encode(text, add_special_tokens=False).offsets if o[1] > o[0]]
    if not offsets:
        return [text] if text.strip() else []
    pieces, step = [], chunk_tokens - overlap
    for first in range(0, len(offsets), step):
        last = min(first + chunk_tokens, len(offsets)) - 1
        begin = 0 if first == 0 else offsets[first][0]
        end = len(text) if last == len(offsets) - 1 else offsets[last + 1][0]
        pieces.append(text[begin:end])
        if last == len(offsets) - 1:
            break
    return pieces


__all__ = ["Index", "chunk_text"]
