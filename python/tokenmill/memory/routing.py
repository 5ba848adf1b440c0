"""The seed's inference routers (SequenceLevelRouter, RollingWindowRouter, TokenLevelRouter,
HybridRouter, create_inference_router) over a trained chapter router, in numpy.

They decide chapters as the core does (softmax over the router's logits, shared chapters masked out,
top k renormalised; the shared chapters are then always added by the model), so they show what a
generation will use; `model.set_routing(...)` or `generate(..., router=...)` makes a model generate
with one. One difference is documented: the core's rolling strategy routes every row by the window
ending at that row, while RollingWindowRouter.route routes a whole call by the window ending at its
last row (the same thing for the one-row calls of decoding)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import InvalidArgumentError

STRATEGIES = ("sequence", "rolling", "token", "hybrid")


class ChapterRouter:
    """A trained router: chapter logits = hidden @ weight.T + bias (weight [C, d], bias [C]); the
    first num_shared_chapters are always used and never routed."""

    def __init__(self, weight, bias=None, num_shared_chapters: int = 0):
        self.weight = np.asarray(weight, np.float64)
        if self.weight.ndim != 2:
            raise InvalidArgumentError(f"router weight must be [chapters, hidden], got shape {list(self.weight.shape)}")
        self.bias = np.zeros(self.weight.shape[0]) if bias is None else np.asarray(bias, np.float64)
        if self.bias.shape != (self.weight.shape[0],):
            raise InvalidArgumentError(f"router bias must be [{self.weight.shape[0]}], got {list(self.bias.shape)}")
        if not 0 <= num_shared_chapters < self.weight.shape[0]:
            raise InvalidArgumentError(f"num_shared_chapters must be in [0, {self.weight.shape[0]})")
        self.num_shared_chapters = num_shared_chapters

    @classmethod
    def from_model(cls, model, layer: int) -> "ChapterRouter":
        """The router of a loaded model's memory layer after decoder layer `layer`."""
        memory = getattr(model, "memory", None)
        if memory is None or not memory.routed:
            raise InvalidArgumentError("the model has no chapter routers")
        if layer not in memory.routers:
            raise InvalidArgumentError(f"no memory router after layer {layer} (layers {sorted(memory.routers)})")
        weight, bias = memory.routers[layer]
        return cls(weight, bias, memory.settings.num_shared_chapters)

    @property
    def num_chapters(self) -> int:
        return self.weight.shape[0]

    def select(self, pooled: np.ndarray, top_k: int):
        """pooled [..., d] -> (chapter indices [..., k], weights [..., k])."""
        if pooled.shape[-1] != self.weight.shape[1]:
            raise InvalidArgumentError(f"hidden states have {pooled.shape[-1]} values, the router takes {self.weight.shape[1]}")
        S = self.num_shared_chapters
        k = min(int(top_k), self.num_chapters - S)
        if k < 1:
            raise InvalidArgumentError(f"top_k must be at least 1, got {top_k}")
        logits = pooled @ self.weight.T + self.bias
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        p[..., :S] = 0
        p /= np.maximum(p.sum(axis=-1, keepdims=True), 1e-12)
        idx = np.argsort(-p, axis=-1, kind="stable")[..., :k]
        w = np.take_along_axis(p, idx, axis=-1)
        return idx, w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-12)


def _as_batch(hidden_states) -> np.ndarray:
    h = np.asarray(hidden_states, np.float64)
    if h.ndim == 2:
        h = h[None]
    if h.ndim != 3:
        raise InvalidArgumentError(f"hidden states must be [batch, seq, hidden] or [seq, hidden], got {list(h.shape)}")
    return h


def _masked_mean(h: np.ndarray, mask) -> np.ndarray:
    if mask is None:
        return h.mean(axis=1)
    m = np.asarray(mask, np.float64).reshape(h.shape[0], h.shape[1], 1)
    return (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)


class _InferenceRouter:
    strategy = ""

    def __init__(self, router, top_k: int, window_size: int = 128):
        self.router = router if isinstance(router, ChapterRouter) else ChapterRouter(*router)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InvalidArgumentError(f"top_k must be a positive integer, got {top_k!r}")
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise InvalidArgumentError(f"window_size must be a positive integer, got {window_size!r}")
        self.top_k, self.window_size = top_k, window_size


class SequenceLevelRouter(_InferenceRouter):
    """Chapters from the mean over the whole sequence (pad-aware with attention_mask)."""

    strategy = "sequence"

    def route(self, hidden_states, attention_mask=None):
        return self.router.select(_masked_mean(_as_batch(hidden_states), attention_mask), self.top_k)


class RollingWindowRouter(_InferenceRouter):
    """Chapters from the mean of the last window_size hidden states, kept across calls."""

    strategy = "rolling"

    def __init__(self, router, top_k: int, window_size: int = 128):
        super().__init__(router, top_k, window_size)
        self._cache: Optional[np.ndarray] = None

    def reset_cache(self) -> None:
        self._cache = None

    def route(self, hidden_states, use_cache: bool = True):
        h = _as_batch(hidden_states)
        if use_cache and self._cache is not None:
            if self._cache.shape[0] != h.shape[0]:
                raise InvalidArgumentError(f"the cache holds {self._cache.shape[0]} sequences, got {h.shape[0]}")
            h = np.concatenate([self._cache, h], axis=1)
        h = h[:, -self.window_size:]
        if use_cache:
            self._cache = h
        return self.router.select(h.mean(axis=1), self.top_k)


class TokenLevelRouter(_InferenceRouter):
    """Chapters per token: indices and weights [batch, seq, top_k]."""

    strategy = "token"

    def route(self, hidden_states):
        return self.router.select(_as_batch(hidden_states), self.top_k)


class HybridRouter(_InferenceRouter):
    """Sequence routing for the prompt, then rolling-window routing while generating."""

    strategy = "hybrid"

    def __init__(self, router, top_k: int, window_size: int = 128):
        super().__init__(router, top_k, window_size)
        self._rolling = RollingWindowRouter(self.router, top_k, window_size)
        self._sequence = SequenceLevelRouter(self.router, top_k, window_size)
        self.generating = False

    def route(self, hidden_states, attention_mask=None):
        if self.generating:
            return self._rolling.route(hidden_states)
        return self._sequence.route(hidden_states, attention_mask)

    def start_generation(self, prefill_hidden_states) -> None:
        """Seeds the rolling window with the prompt's hidden states."""
        self._rolling.reset_cache()
        self._rolling._cache = _as_batch(prefill_hidden_states)[:, -self.window_size:]
        self.generating = True

    def reset(self) -> None:
        self._rolling.reset_cache()
        self.generating = False


_ROUTERS = {"sequence": SequenceLevelRouter, "rolling": RollingWindowRouter, "token": TokenLevelRouter,
            "hybrid": HybridRouter}


def create_inference_router(router, strategy: str, top_k: int, window_size: int = 128):
    """One of the routers above by strategy name ("sequence", "rolling", "token", "hybrid")."""
    if strategy not in _ROUTERS:
        raise InvalidArgumentError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return _ROUTERS[strategy](router, top_k, window_size)
