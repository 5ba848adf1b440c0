"""One sequence's state: its KV cache and token history, its sampler, the logits of its next
position, and the context rules (overflow, sliding, rollback). `evaluate` runs the pending tokens of
several sequences through one forward pass per step. Per-token work is O(1) in the history's length:
the history is a growing int32 buffer the sampler reads in place."""

from __future__ import annotations

from typing import Optional, Sequence as Seq

import numpy as np

from ..engine.cache import CacheSpec
from ..engine.model import EngineModel
from ..errors import ContextOverflowError, InvalidArgumentError
from .cache_plan import CachePlan, select_cache_plan
from .config import GenerateConfig
from .result import TokenLogprob


def check_model(model) -> None:
    if not isinstance(model, EngineModel):
        raise InvalidArgumentError(f"model must be a tokenmill.Model (from tokenmill.load), got {type(model).__name__}")


class TokenBuffer:
    """A growing list of token ids in an int32 array (amortised O(1) append, O(1) views)."""

    __slots__ = ("_data", "_n")

    def __init__(self, ids: Seq[int] = ()):
        self._data = np.zeros(max(64, 2 * len(ids)), dtype=np.int32)
        self._n = len(ids)
        self._data[: self._n] = ids

    def __len__(self) -> int:
        return self._n

    def view(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        return self._data[start : self._n if stop is None else stop]

    def tolist(self) -> list[int]:
        return self._data[: self._n].tolist()

    def append(self, token: int) -> None:
        if self._n == len(self._data):
            self._data = np.concatenate([self._data, np.zeros_like(self._data)])
        self._data[self._n] = token
        self._n += 1

    def extend(self, ids: Seq[int]) -> None:
        need = self._n + len(ids)
        if need > len(self._data):
            grown = np.zeros(max(need, 2 * len(self._data)), dtype=np.int32)
            grown[: self._n] = self._data[: self._n]
            self._data = grown
        self._data[self._n : need] = ids
        self._n = need

    def truncate(self, n: int) -> None:
        self._n = n


def as_ids(model: "EngineModel", input_ids, first: bool) -> list[int]:
    """Token ids from text (tokenized, special tokens added for a first turn) or checked ids."""
    if isinstance(input_ids, str):
        return model.tokenize(input_ids, add_special_tokens=first)
    return model.check_ids(input_ids, "input_ids")


def _cache_plan(model: "EngineModel", config: GenerateConfig, capacity: int) -> CachePlan:
    if config.cache.kind == "auto":
        return select_cache_plan(model, config, capacity)
    return CachePlan(config.cache.k_kind, config.cache.v_kind, "fixed")


class Sequence:
    """One sequence: its cache and token history, its sampler, and the rules that end it.

    `capacity` is the context limit (max_seq_len); the cache's memory grows with the history
    instead of being allocated for the whole context up front."""

    def __init__(self, model: EngineModel, config: GenerateConfig, reserve: int = 0, cache=None):
        check_model(model)
        self.model = model
        self.config = config
        self.capacity = min(config.context.max_seq_len or model.n_ctx, model.n_ctx)
        if cache is not None:   # a cache from elsewhere (a scheduler's pool): its kinds are the pool's
            self.cache_plan = CachePlan(cache.spec.k_kind, cache.spec.v_kind, "fixed")
            self.q_chunk = None
            self.capacity = min(self.capacity, cache.capacity)
            self.cache = cache
        else:
            self.cache_plan = _cache_plan(model, config, self.capacity)
            self.q_chunk, local_window = config.prefill.attention_plan(self.capacity)
            spec = CacheSpec(self.cache_plan.k_kind, self.cache_plan.v_kind, config.cache.residual_len,
                             config.cache.fp16_prefix_layers, local_window)
            self.cache = model.new_cache(self.capacity, spec, reserve=min(reserve, self.capacity))
        self.adapter_slot = model.adapter_slot(config.model.adapter)   # the cache holds K/V computed with it
        self.history = TokenBuffer()       # every token in the context, evaluated or not
        self.logits: Optional[np.ndarray] = None   # next-token logits after history (when evaluated)
        self.sampler = model.new_sampler(**config.sampling.sampler_params())

    # ---- context bookkeeping
    def pending(self, limit: Optional[int] = None) -> np.ndarray:
        """Tokens in the history that the cache has not seen yet (at most `limit`)."""
        start = self.cache.n_past
        return self.history.view(start, None if limit is None else min(start + limit, len(self.history)))

    def reserve(self, n_new: int) -> None:
        """Lets the cache allocate room for the history plus n_new tokens in one step."""
        self.cache.reserve(min(len(self.history) + n_new, self.capacity))

    def extend(self, ids: list[int], room: int) -> None:
        """Appends input ids (already checked), applying the overflow policy so that `room` new
        tokens still fit."""
        total = len(self.history) + len(ids)
        if total + min(room, 1) > self.capacity:
            mode = self.config.context.context_overflow
            if mode == "error":
                raise ContextOverflowError(
                    f"the input needs {total} tokens (+{min(room, 1)} to generate) but max_seq_len is {self.capacity}; "
                    "use context_overflow='truncate' or 'slide' to drop the oldest tokens"
                )
            reserve = 1 if mode == "slide" else max(min(room, self.capacity // 2), 1)
            keep = self.capacity - reserve
            self._replace_history((self.history.tolist() + ids)[-keep:])
            return
        self.history.extend(ids)
        if ids:
            self.logits = None

    def _replace_history(self, tokens: list[int]) -> None:
        """Starts the cache over with `tokens` (positions change, so nothing cached is reusable)."""
        self.cache.truncate(0)
        self.history = TokenBuffer(tokens)
        self.logits = None

    def make_room(self) -> bool:
        """Before adding a token: False if the context is full and the policy says stop."""
        if len(self.history) < self.capacity:
            return True
        if self.config.context.context_overflow != "slide":
            return False
        self._replace_history(self.history.view(len(self.history) - (self.capacity - 1)).tolist())
        return True

    def rollback(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0 or n > len(self.history):
            raise InvalidArgumentError(f"cannot roll back {n!r} of {len(self.history)} tokens")
        if n == 0:
            return
        self.history.truncate(len(self.history) - int(n))
        # keep at least the last token pending so its logits are recomputed on the next step
        self.cache.truncate(min(self.cache.n_past, max(len(self.history) - 1, 0)))
        self.logits = None

    def append(self, token: int) -> None:
        """Adds a sampled token to the context (evaluated on the next step)."""
        self.history.append(token)
        self.logits = None

    # ---- sampling
    def sample(self, sampler=None, allowed: Optional[np.ndarray] = None) -> int:
        """The next token from the sequence's logits (only `allowed` ids eligible, if given)."""
        return int((sampler or self.sampler).sample(self.logits, self.history.view(), allowed))


def token_logprob(logits: np.ndarray, token: int, top_n: int) -> TokenLogprob:
    """Log-probability of `token` under the model's own distribution (before sampling filters), with
    the top_n most likely alternatives."""
    z = logits.astype(np.float64)
    logp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
    top = []
    if top_n > 0:
        idx = np.argpartition(-logp, min(top_n, logp.size - 1))[:top_n]
        idx = idx[np.argsort(-logp[idx], kind="stable")]
        top = [(int(i), float(logp[i])) for i in idx]
    return TokenLogprob(token, float(logp[token]), top)


def evaluate(model: "EngineModel", seqs: Seq[Sequence]) -> None:
    """Forward passes over every sequence's pending tokens (long ones first go through in chunks of
    their q_chunk, without logits); stores each one's next logits."""
    todo = [s for s in seqs if s.logits is None and len(s.history)]
    if not todo:
        return
    for s in todo:
        if s.cache.n_past == len(s.history):   # all cached but the logits were dropped: re-run the last token
            s.cache.truncate(len(s.history) - 1)
    while True:
        long = [s for s in todo if s.q_chunk and len(s.history) - s.cache.n_past > s.q_chunk]
        if not long:
            break
        model.eval_batch([s.cache for s in long], [s.pending(s.q_chunk) for s in long], logits=None,
                         adapters=[s.adapter_slot for s in long])
    logits = model.eval_batch([s.cache for s in todo], [s.pending() for s in todo], logits="last",
                              adapters=[s.adapter_slot for s in todo]).logits
    for s, row in zip(todo, logits):
        s.logits = row
