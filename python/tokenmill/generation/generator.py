"""The stateful `Generator` (a conversation whose KV cache persists across calls) and the stateless
`generate()`. Every path runs the same per-sequence machinery: `Sequence` (cache, history, context
rules), `evaluate` (forward passes), `Run` (sampling and stopping)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np

from ..errors import ConcurrentUseError, ContextOverflowError, InvalidArgumentError
from .cache_plan import CachePlan
from .config import GenerateConfig
from .result import GenerationResult
from .batch import generate_batch
from .run import Event, Run
from .sequence import Sequence, as_ids, check_model, evaluate

if TYPE_CHECKING:
    from ..engine.model import EngineModel

# fields that shape the KV cache, fixed once a Generator exists
_CACHE_SHAPING = ("cache", "prefill", "model")


class Generator:
    """A conversation with a model: the KV cache persists across calls, so a second `generate`
    only evaluates the new tokens. One caller at a time: a call from a second thread while another
    is running raises ConcurrentUseError (a Model may be shared by many Generators)."""

    def __init__(self, model: "EngineModel", config: Optional[GenerateConfig] = None, **overrides: Any):
        check_model(model)
        if config is not None and not isinstance(config, GenerateConfig):
            raise InvalidArgumentError(f"config must be a GenerateConfig, got {type(config).__name__}")
        self.model = model
        self.config = (config or GenerateConfig()).replace(**overrides)
        self._seq = Sequence(model, self.config)
        self.last: Optional[GenerationResult] = None
        self._busy = threading.Lock()
        self._active: Optional[Run] = None       # the run a stream is driving
        self._active_thread: Optional[int] = None

    # ---- state
    @property
    def tokens(self) -> list[int]:
        """Every token in the context (inputs and generated)."""
        return self._seq.history.tolist()

    @property
    def n_cached(self) -> int:
        return self._seq.cache.n_past

    @property
    def cache_plan(self) -> CachePlan:
        """The KV cache kinds in use and, for cache_kind="auto", every candidate's measurements."""
        return self._seq.cache_plan

    @property
    def cache_bytes(self) -> int:
        """The memory the KV cache holds now (it grows with the context, up to max_seq_len)."""
        return self._seq.cache.bytes

    @contextmanager
    def _exclusive(self):
        if not self._busy.acquire(blocking=False):
            raise ConcurrentUseError("this Generator is in use by another thread; use one Generator per thread")
        try:
            active = self._active
            if active is not None and not active.done and self._active_thread != threading.get_ident():
                raise ConcurrentUseError("another thread is streaming from this Generator")
            yield
        finally:
            self._busy.release()

    def reset(self) -> None:
        with self._exclusive():
            self._abandon_active()
            self._seq._replace_history([])

    def rollback(self, n: int) -> None:
        """Removes the last n tokens from the context."""
        with self._exclusive():
            self._abandon_active()
            self._seq.rollback(n)

    def prefill(self, input_ids) -> None:
        """Appends input tokens to the context and evaluates them."""
        with self._exclusive():
            self._abandon_active()
            ids = as_ids(self.model, input_ids, first=not len(self._seq.history))
            self._seq.extend(ids, room=1)
            self._seq.reserve(1)
            evaluate(self.model, [self._seq])

    def decode_step(self) -> int:
        """Samples the next token, appends it to the context and returns it (EOS included)."""
        with self._exclusive():
            self._abandon_active()
            seq = self._seq
            if not len(seq.history):
                raise InvalidArgumentError("the context is empty: prefill() first")
            if not seq.make_room():
                raise ContextOverflowError(f"the context is full ({seq.capacity} tokens)")
            evaluate(self.model, [seq])
            token = seq.sample()
            seq.append(token)
            return token

    # ---- generation
    def generate_iter(self, input_ids=None, **overrides: Any) -> Iterator[int]:
        """Yields new token ids as they are generated; details land on `self.last`."""
        for token, _ in self.drive(self.start(input_ids, **overrides)):
            if token is not None:
                yield token

    def generate(self, input_ids=None, **overrides: Any) -> list[int]:
        """Continues the context with `input_ids` (ids or text) and returns the new token ids."""
        for _ in self.drive(self.start(input_ids, **overrides)):
            pass
        return list(self.last.token_ids)

    def start(self, input_ids=None, **overrides: Any) -> Run:
        """Checks the call and appends its input (errors surface here, before any iteration)."""
        fixed = sorted(k for k in overrides if k.startswith(("cache_", "decode_")) or k in ("max_seq_len", "adapter")
                       or k in _CACHE_SHAPING)
        if fixed:
            raise InvalidArgumentError(
                f"{', '.join(fixed)} shape the KV cache, which exists once the Generator is created; "
                "pass them to the Generator"
            )
        config = self.config.replace(**overrides)
        with self._exclusive():
            self._abandon_active()
            seq = self._seq
            ids = as_ids(self.model, input_ids, first=not len(seq.history)) if input_ids is not None else []
            if not ids and not len(seq.history):
                raise InvalidArgumentError("the prompt is empty")
            sampler = None
            if config.sampling != self.config.sampling:   # this call only
                sampler = self.model.new_sampler(**config.sampling.sampler_params())
            run = Run(seq, config, prompt_tokens=len(ids), sampler=sampler)
            seq.extend(ids, room=config.stopping.max_new_tokens)
            seq.reserve(config.stopping.max_new_tokens)
            self._active, self._active_thread = run, threading.get_ident()
            self.last = None
            return run

    def _abandon_active(self) -> None:
        """A new call from the stream's own thread ends a stream it left unfinished."""
        if self._active is not None and not self._active.done:
            self._active.finish("cancelled")
            self.last = self._active.result()
        self._active = None

    def drive(self, run: Run) -> Iterator[Event]:
        """Steps `run` to its end, yielding its events; `self.last` holds the result afterwards
        (finish_reason "cancelled" if the caller stopped early or pressed Ctrl-C)."""
        seq = self._seq
        try:
            while not run.done:
                with self._exclusive():
                    if self._active is not run:
                        raise ConcurrentUseError("this stream was superseded by a later call on its Generator")
                    saved = seq.config
                    seq.config = run.config   # context_overflow may be set per call
                    try:
                        events = self._step(run)
                    finally:
                        seq.config = saved
                yield from events
        finally:
            if self._active is run:
                if not run.done:
                    run.finish("cancelled")
                self.last = run.result()
                self._active = None


    def _step(self, run: Run) -> list[Event]:
        """One step of a run: evaluate what is pending, sample a token (or end at max_new_tokens)."""
        if not run.limit_reached():
            evaluate(self.model, [self._seq])
        return run.step()


def generate(model: "EngineModel", input_ids, config: Optional[GenerateConfig] = None, **overrides: Any):
    """Stateless generation: new token ids for one prompt (a list of ids), or one list per prompt
    for a batch (a list of lists), decoded together."""
    check_model(model)
    if config is not None and not isinstance(config, GenerateConfig):
        raise InvalidArgumentError(f"config must be a GenerateConfig, got {type(config).__name__}")
    config = (config or GenerateConfig()).replace(**overrides)
    if isinstance(input_ids, np.ndarray) and input_ids.ndim == 2:
        input_ids = input_ids.tolist()
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple, np.ndarray)):
        return [r.token_ids for r in generate_batch(model, list(input_ids), [config] * len(input_ids))]
    return Generator(model, config).generate(input_ids)
