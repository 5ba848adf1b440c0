"""Retrieval-augmented generation: embeddings (`Model.embed`), an exact cosine `Index`, document
chunking, reranking by query likelihood under a decoder, training-free prompt compression
(`compress_prompt`, LongLLMLingua-style), and the `Pipeline` that puts them together."""

from .clara import Clara, ClaraConfig
from .compress import CompressedPrompt, compress_prompt
from .embeddings import Embedder, SentenceConfig
from .index import Index, chunk_text
from .pipeline import Answer, Pipeline, read_documents
from .rerank import rerank, score_documents

__all__ = ["Answer", "Clara", "ClaraConfig", "CompressedPrompt", "Embedder", "Index", "Pipeline", "SentenceConfig", "chunk_text",
           "compress_prompt", "read_documents", "rerank", "score_documents"]
