"""Retrieval-augmented generation: embeddings (`Model.embed`), an exact cosine `Index`, document
chunking, and reranking by query likelihood under a decoder."""

from .embeddings import Embedder, SentenceConfig
from .index import Index, chunk_text
from .rerank import rerank, score_documents

__all__ = ["Embedder", "Index", "SentenceConfig", "chunk_text", "rerank", "score_documents"]
