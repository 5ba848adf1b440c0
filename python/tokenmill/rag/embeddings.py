"""Text embeddings from any loaded model: encoders of the BERT family (all-MiniLM-L6-v2 and the like)
and decoders (final hidden states).

    m = tokenmill.load("all-MiniLM-L6-v2/")      # a sentence-transformers directory
    vectors = m.embed(["a sentence", "another"])   # numpy float32 [2, 384], unit length

A directory's sentence-transformers files are honoured: `1_Pooling/config.json` chooses the pooling
(mean or CLS), a `Normalize` module in `modules.json` the L2 normalisation, and
`sentence_bert_config.json`'s `max_seq_length` the truncation, over the tokenizer's own. Longer texts
are truncated to that many tokens, special tokens included, as sentence-transformers does; decoders'
texts to the model's context. Each text is its own sequence (no padding), so masked mean pooling is
the plain mean of its rows; texts go through the model together, up to `batch_tokens` rows per pass."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from ..errors import InvalidArgumentError, ModelFormatError

if TYPE_CHECKING:
    from ..engine.model import EngineModel

POOLINGS = ("mean", "cls", "last")


@dataclass(frozen=True)
class SentenceConfig:
    """What a sentence-transformers directory says about embedding with it (defaults: none said)."""

    pooling: Optional[str] = None
    normalize: Optional[bool] = None
    max_seq_length: Optional[int] = None


def _json(path: Path) -> Optional[object]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path} is not valid JSON ({exc})") from None


def sentence_config(directory: Path) -> SentenceConfig:
    modules = _json(directory / "modules.json")
    pooling = normalize = None
    if isinstance(modules, list):
        types = {m.get("type", ""): m.get("path", "") for m in modules if isinstance(m, dict)}
        normalize = any(t.endswith("Normalize") for t in types)
        pool_dir = next((p for t, p in types.items() if t.endswith("Pooling")), None)
        pool = _json(directory / pool_dir / "config.json") if pool_dir is not None else None
        if isinstance(pool, dict):
            if pool.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif pool.get("pooling_mode_mean_tokens"):
                pooling = "mean"
            elif pool.get("pooling_mode_lasttoken"):
                pooling = "last"
            else:
                modes = sorted(k for k, v in pool.items() if k.startswith("pooling_mode") and v)
                raise ModelFormatError(f"{directory}: pooling {', '.join(modes) or 'none'} is not supported "
                                       f"(mean, CLS and last-token are)")
    st = _json(directory / "sentence_bert_config.json")
    max_len = st.get("max_seq_length") if isinstance(st, dict) else None
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2):
        raise ModelFormatError(f"{directory}/sentence_bert_config.json: max_seq_length must be an integer >= 2")
    return SentenceConfig(pooling, normalize, max_len)


class Embedder:
    """Embeds texts with one model (made once per model: it keeps a truncating copy of the tokenizer)."""

    def __init__(self, model: "EngineModel"):
        tok = model._require_tokenizer()
        self.model = model
        source = Path(model.path)
        self.sentence = sentence_config(source) if source.is_dir() else SentenceConfig()
        limit = self.sentence.max_seq_length or model.n_ctx
        self.max_length = min(limit, model.n_ctx)
        from tokenizers import Tokenizer as HFTokenizer

        self._hf = HFTokenizer.from_str(tok.hf.to_str())
        self._hf.enable_truncation(self.max_length)

    @property
    def dim(self) -> int:
        return self.model.n_embd

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise InvalidArgumentError("texts must be a list of strings")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidArgumentError(f"texts[{i}] is a {type(t).__name__}, not a string")
        ids = [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=True)]
        for i, row in enumerate(ids):
            if not row:
                raise InvalidArgumentError(f"texts[{i}] has no tokens (an empty text, for a model that adds none)")
        return ids

    def embed(self, texts: Sequence[str], pooling: Optional[str] = None, normalize: Optional[bool] = None,
              batch_tokens: int = 4096) -> np.ndarray:
        pooling = pooling or self.sentence.pooling or "mean"
        if pooling not in POOLINGS:
            raise InvalidArgumentError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if normalize is None:
            normalize = self.sentence.normalize if self.sentence.normalize is not None else True
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise InvalidArgumentError(f"batch_tokens must be a positive integer, got {batch_tokens!r}")
        ids = self.token_ids(texts)
        out = np.empty((len(ids), self.dim), np.float32)
        start = 0
        while start < len(ids):   # texts in input order, as many per pass as batch_tokens allows (at least one)
            end, rows = start, 0
            while end < len(ids) and (end == start or rows + len(ids[end]) <= batch_tokens):
                rows += len(ids[end])
                end += 1
            self._pass(ids[start:end], pooling, out[start:end])
            start = end
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def _pass(self, ids: list[list[int]], pooling: str, out: np.ndarray) -> None:
        m = self.model
        caches = [m.new_cache(len(row)) for row in ids]
        if pooling == "mean":
            hidden = m.eval_batch(caches, ids, logits=None, hidden="all").hidden
            start = 0
            for i, row in enumerate(ids):
                out[i] = hidden[start:start + len(row)].mean(axis=0, dtype=np.float64)
                start += len(row)
            return
        rows, start = [], 0
        for row in ids:
            rows.append(start if pooling == "cls" else start + len(row) - 1)
            start += len(row)
        out[:] = m.eval_batch(caches, ids, logits=None, hidden=rows).hidden
