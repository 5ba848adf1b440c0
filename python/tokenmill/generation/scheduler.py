"""Continuous batching: the `Scheduler` owns the requests, one KV pool and the step.

Requests arrive at any time (`submit`, thread-safe; `Request.events()` / `async Request.aevents()` stream
them, `cancel()` stops one). Each step is one forward pass over every running sequence: one decode row
per sequence that has a new token, then chunks of waiting prompts within `max_batch_tokens`, so a long
prompt never stalls the others; finished or cancelled sequences leave at once and waiting ones join.

Memory is one `KVPool` of `kv_budget_mb` in blocks of `block_size` positions. A request is admitted
only when the pool can hold everything it may still need (prompt + max_new_tokens, beyond what it
shares), so a running sequence never meets a full pool: requests wait instead, and nothing is ever
preempted or recomputed. Prefix caching: full blocks of finished prompts stay in the pool, keyed by
their tokens, and a request whose prompt starts with them adopts them instead of recomputing them --
and the positions it shares of one more cached block (copied before it writes there), so a system
prompt is reused to its last token, not to its last whole block (least recently used blocks are
evicted when blocks run short); `n` completions of one prompt share it.
A request whose prompt shares whole blocks with a prompt still being computed waits for it (usually
one step) rather than computing the same blocks beside it.

Exactness (batch_invariant, the default): decode rows are computed with the arithmetic of a lone
decode step and prompt rows with the prefill kernels whatever their number, so a request's tokens are
the same alone or among 63 others, however its prompt was chunked."""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Optional, Sequence as Seq

import numpy as np

from ..engine.cache import CacheSpec
from ..errors import InvalidArgumentError, KVPoolFullError, TokenmillError
from .config import GenerateConfig
from .prefix_cache import PrefixCache
from .result import GenerationResult
from .run import Run
from .sequence import Sequence, as_ids, check_model

if TYPE_CHECKING:
    from ..engine.model import EngineModel


@dataclass(frozen=True)
class SchedulerConfig:
    """kv_budget_mb: the KV pool (MB); block_size: positions per block; max_batch_tokens: rows per
    step (decode rows included); max_running: sequences in flight; cache_kind / cache_kind_v: how the
    pool stores K and V (every request shares them); prefix_cache: keep finished prompts' blocks for
    reuse; batch_invariant: outputs independent of the batch (module docstring)."""

    kv_budget_mb: float = 512.0
    block_size: int = 16
    max_batch_tokens: int = 512
    max_running: int = 64
    cache_kind: str = "fp32"
    cache_kind_v: Optional[str] = None
    prefix_cache: bool = True
    batch_invariant: bool = True

    def __post_init__(self):
        for name, lo in (("block_size", 1), ("max_batch_tokens", 1), ("max_running", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise InvalidArgumentError(f"{name} must be an integer >= {lo}, got {value!r}")
        if isinstance(self.kv_budget_mb, bool) or not isinstance(self.kv_budget_mb, (int, float)) or \
                not math.isfinite(self.kv_budget_mb) or self.kv_budget_mb <= 0:
            raise InvalidArgumentError(f"kv_budget_mb must be a positive number, got {self.kv_budget_mb!r}")
        CacheSpec(self.cache_kind, self.cache_kind_v or self.cache_kind)

    @property
    def spec(self) -> CacheSpec:
        return CacheSpec(self.cache_kind, self.cache_kind_v or self.cache_kind)


class Request:
    """One submitted generation: stream its (token, text) events, wait for its GenerationResult, or
    cancel it. Events and the result come from the scheduler's thread; both views are thread-safe,
    and `aevents()` is an async iterator for asyncio code."""

    _DONE = object()

    def __init__(self, rid: int, prompt: list[int], config: GenerateConfig, loop: Optional[asyncio.AbstractEventLoop]):
        self.id = rid
        self.prompt = prompt
        self.config = config
        self.result: Optional[GenerationResult] = None
        self.error: Optional[BaseException] = None
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._loop = loop
        self._aqueue: Optional[asyncio.Queue] = asyncio.Queue() if loop is not None else None
        self._done = threading.Event()
        self.cancelled = False
        self.adapter_slot = -1   # the model's slot for config.adapter (set at submission)
        # with config logprobs: one TokenLogprob per token event so far, filled before the event is
        # put, so a reader of the k-th token event finds its entry at [k] (streamed logprobs)
        self.token_logprobs: list = []

    # ---- scheduler side
    def _put(self, item) -> None:
        self._events.put(item)
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, item)
            except RuntimeError:   # the loop is closed: its reader is gone
                pass

    def _finish(self, result: Optional[GenerationResult], error: Optional[BaseException] = None) -> None:
        self.result, self.error = result, error
        self._done.set()
        self._put(Request._DONE)

    # ---- caller side
    def cancel(self) -> None:
        """Stops the request at the next step; its result's finish_reason is "cancelled"."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} is not done after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def events(self) -> Iterator[tuple[Optional[int], str]]:
        """(token id or None, text piece) as generated; ends when the request does."""
        while True:
            item = self._events.get()
            if item is Request._DONE:
                if self.error is not None:
                    raise self.error
                return
            yield item

    async def aevents(self) -> AsyncIterator[tuple[Optional[int], str]]:
        if self._aqueue is None:
            raise InvalidArgumentError("this request was not submitted with an event loop (use Scheduler.asubmit)")
        while True:
            item = await self._aqueue.get()
            if item is Request._DONE:
                if self.error is not None:
                    raise self.error
                return
            yield item


class _Slot:
    """A request's sequence inside the scheduler."""

    __slots__ = ("req", "seq", "run", "prompt_len", "worst_blocks", "leader", "followers", "prompt_logits",
                 "prompt_blocks", "registered", "index")

    def __init__(self, req: Request, index: int, leader: Optional["_Slot"]):
        self.req = req
        self.index = index                  # completion index within an n > 1 group
        self.leader = leader                # followers fork from their leader's prompt
        self.followers: list[_Slot] = []
        self.seq: Optional[Sequence] = None
        self.run: Optional[Run] = None
        self.prompt_len = len(req.prompt)
        self.worst_blocks = 0
        self.prompt_logits: Optional[np.ndarray] = None   # a leader's logits after its prompt (for followers)
        self.prompt_blocks: list[int] = []   # the leader's prompt blocks, held in the pool until its forks start
        self.registered = False


class Scheduler:
    """Continuous batching over one model (module docstring). Use it from threads (`submit`, then
    `Request.events()` / `wait()`), from asyncio (`asubmit`, `Request.aevents()`), or without a
    thread (`run_until_done()`). `start()` runs steps on a thread of its own; `close()` stops it."""

    def __init__(self, model: "EngineModel", config: Optional[SchedulerConfig] = None, **overrides: Any):
        check_model(model)
        self.model = model
        base = config or SchedulerConfig()
        self.config = SchedulerConfig(**{**base.__dict__, **overrides}) if overrides else base
        # routed memory layers keep per-sequence routing state: positions adopted from another cache
        # lack it, and sequence / hybrid routing is decided by a prompt's first pass, so every prompt
        # is computed by its own sequence in one pass
        memory = getattr(model, "memory", None)
        self._whole_prompts = memory is not None and memory.routed
        if self._whole_prompts and self.config.prefix_cache:
            self.config = SchedulerConfig(**{**self.config.__dict__, "prefix_cache": False})
        cfg = self.config
        n_blocks = model.pool_blocks(cfg.kv_budget_mb, cfg.block_size, cfg.spec)
        if n_blocks < 1:
            raise InvalidArgumentError(f"kv_budget_mb={cfg.kv_budget_mb} holds no block of {cfg.block_size} positions")
        self.pool = model.new_pool(n_blocks, cfg.block_size, cfg.spec)
        self.prefix = PrefixCache(self.pool)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: list[_Slot] = []
        self._waiting: collections.deque[_Slot] = collections.deque()
        self._running: list[_Slot] = []
        self._ids = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._closing = False
        # steps, rows, decode_rows, prompt_rows, prefix_tokens, prefix_waits, requests, cancelled
        self.stats = collections.Counter()

    # ---- submission
    def submit(self, prompt, config: Optional[GenerateConfig] = None, n: int = 1, *,
               loop: Optional[asyncio.AbstractEventLoop] = None, **overrides: Any) -> list[Request]:
        """Queues n completions of prompt (text or ids); returns their Requests. Each completion gets
        its own sampler (seed + index when a seed is given); they share the prompt's KV blocks."""
        if config is not None and not isinstance(config, GenerateConfig):
            raise InvalidArgumentError(f"config must be a GenerateConfig, got {type(config).__name__}")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 128:
            raise InvalidArgumentError(f"n must be an integer in [1, 128], got {n!r}")
        config = (config or GenerateConfig()).replace(**overrides)
        if config.cache.kind == "auto":
            raise InvalidArgumentError("a scheduler's requests share its pool's cache kind; cache_kind='auto' does not apply")
        ids = as_ids(self.model, prompt, first=True)
        if not ids:
            raise InvalidArgumentError("the prompt is empty")
        capacity = min(config.context.max_seq_len or self.model.n_ctx, self.model.n_ctx)
        if len(ids) + min(config.stopping.max_new_tokens, 1) > capacity and config.context.context_overflow == "error":
            from ..errors import ContextOverflowError

            raise ContextOverflowError(f"the prompt needs {len(ids)} tokens (+1 to generate) but max_seq_len is {capacity}")
        adapter_slot = self.model.adapter_slot(config.model.adapter)   # checked now, before anything queues
        slots, requests = [], []
        for i in range(n):
            cfg = config
            if i and config.sampling.seed is not None:
                cfg = config.replace(seed=(config.sampling.seed + i) % 2**64)
            req = Request(next(self._ids), ids, cfg, loop)
            req.adapter_slot = adapter_slot
            leader = slots[0] if i and not self._whole_prompts else None
            slot = _Slot(req, i, leader)
            if leader is not None:
                leader.followers.append(slot)
            slots.append(slot)
            requests.append(req)
        with self._wake:
            if self._closing:
                raise TokenmillError("the scheduler is closed")
            self._incoming.extend(slots)
            self.stats["requests"] += n
            self._wake.notify()
        return requests

    async def asubmit(self, prompt, config: Optional[GenerateConfig] = None, n: int = 1, **overrides: Any) -> list[Request]:
        return self.submit(prompt, config, n, loop=asyncio.get_running_loop(), **overrides)

    # ---- running
    def start(self) -> "Scheduler":
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="tokenmill-scheduler", daemon=True)
                self._thread.start()
        return self

    def close(self, cancel: bool = True) -> None:
        """Stops taking requests; with cancel, ends running ones as cancelled, else lets them finish."""
        with self._wake:
            self._closing = True
            if cancel:
                for s in self._incoming + list(self._waiting) + self._running:
                    s.req.cancel()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            self.run_until_done()
        self.prefix.clear()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._incoming or self._waiting or self._running) and not self._closing:
                    self._wake.wait()
                if self._closing and not (self._incoming or self._waiting or self._running):
                    return
            self.step()

    def run_until_done(self) -> None:
        """Steps until every submitted request is finished (no thread needed)."""
        while True:
            with self._lock:
                if not (self._incoming or self._waiting or self._running):
                    return
            self.step()

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._incoming) + len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    # ---- one step
    def step(self) -> None:
        """Admits what fits, runs one forward pass over the batch, samples, and retires finished
        sequences. Errors of a request end that request; others go on."""
        with self._lock:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
        self._drop_cancelled()
        self._admit()
        # sequences whose logits are ready (forks) sample now; those at their length limit end now
        for slot in list(self._running):
            if slot.run.limit_reached() or slot.seq.logits is not None:
                self._advance(slot)
        batch = self._build_batch()
        if batch:
            self._forward(batch)

    def _drop_cancelled(self) -> None:
        for slot in [s for s in self._waiting if s.req.cancelled]:
            self._waiting.remove(slot)
            self.stats["cancelled"] += 1
            slot.req._finish(GenerationResult([], "" if self.model.tokenizer else None, "cancelled", len(slot.req.prompt),
                                              0, 0.0, 0.0))
            if slot.leader is not None:
                self._release_prompt_blocks(slot.leader)
        for slot in [s for s in self._running if s.req.cancelled]:
            self.stats["cancelled"] += 1
            for ev in slot.run.finish("cancelled"):
                slot.req._put(ev)
            self._retire(slot)

    def _release_prompt_blocks(self, leader: _Slot) -> None:
        """Drops the leader's hold on its prompt blocks once no fork waits to adopt them."""
        if leader.prompt_blocks and all(f.seq is not None or f.req.done for f in leader.followers):
            for block in leader.prompt_blocks:
                self.pool.release(block)
            leader.prompt_blocks = []

    def _blocks_for(self, tokens: int) -> int:
        return (tokens + self.config.block_size - 1) // self.config.block_size

    def _outstanding(self) -> int:
        return sum(max(s.worst_blocks - len(s.seq.cache.block_table), 0) for s in self._running)

    def _prefix_in_flight(self, req: Request, cached_blocks: int) -> bool:
        """Whether a running prompt not yet in the prefix cache shares more whole blocks with req's
        prompt than the cache holds: then req waits a step or two and adopts them instead of
        computing them again (requests that arrive together with one system prompt share it)."""
        bs = self.config.block_size
        usable = (len(req.prompt) - 1) // bs
        if usable <= cached_blocks:
            return False
        mine = np.asarray(req.prompt[: usable * bs])
        for other in self._running:
            if other.registered or other.req.adapter_slot != req.adapter_slot or other.leader is not None:
                continue
            theirs = np.asarray(other.req.prompt[: usable * bs])
            n = min(len(mine), len(theirs))
            differ = np.flatnonzero(mine[:n] != theirs[:n])
            if (int(differ[0]) if differ.size else n) // bs > cached_blocks:
                return True
        return False

    def _admit(self) -> None:
        bs = self.config.block_size
        deferred: list[_Slot] = []   # waiting for a prefix that a running prompt is computing
        try:
            self._admit_from_queue(bs, deferred)
        finally:
            self._waiting.extendleft(reversed(deferred))

    def _admit_from_queue(self, bs: int, deferred: list) -> None:
        while self._waiting and len(self._running) < self.config.max_running:
            slot = self._waiting[0]
            req = slot.req
            if slot.leader is not None and slot.leader.prompt_logits is None:
                if slot.leader.req.done and slot.leader.prompt_logits is None:   # the leader failed or was cancelled
                    slot.leader = None
                else:
                    break   # forks wait for their leader's prompt
            capacity = min(req.config.context.max_seq_len or self.model.n_ctx, self.model.n_ctx)
            worst = self._blocks_for(min(capacity, len(req.prompt) + req.config.stopping.max_new_tokens)) + 1
            if worst > self.pool.n_blocks:
                self._waiting.popleft()
                req._finish(None, KVPoolFullError(
                    f"the request may need {worst} KV blocks of {bs} positions but the pool has {self.pool.n_blocks}; "
                    "raise kv_budget_mb or lower max_tokens"))
                continue
            if slot.leader is not None:
                shared = slot.leader.prompt_blocks
                n_shared = slot.prompt_len
            else:
                shared, n_cached = self.prefix.lookup(req.prompt, bs, req.adapter_slot) if self.config.prefix_cache else ([], 0)
                if self.config.prefix_cache and self._prefix_in_flight(req, n_cached // bs):
                    deferred.append(self._waiting.popleft())
                    self.stats["prefix_waits"] += 1
                    continue
                n_shared = min(n_cached, len(req.prompt) - 1)
                shared = shared[: self._blocks_for(n_shared)]
            available = self.pool.free_blocks + self.prefix.evictable() - self._outstanding()
            if available < worst - len(shared):
                break   # wait for blocks
            self._waiting.popleft()
            cache = self.model.new_paged_cache(self.pool, capacity)
            if n_shared:
                cache.adopt(shared, n_shared)
                self.stats["prefix_tokens"] += n_shared if slot.leader is None else 0
            seq = Sequence(self.model, req.config, cache=cache)
            seq.extend(req.prompt, room=req.config.stopping.max_new_tokens)
            if slot.leader is not None:
                seq.logits = slot.leader.prompt_logits
                slot.registered = True   # the leader registers the shared prompt
            slot.seq = seq
            slot.run = Run(seq, req.config, prompt_tokens=len(req.prompt))
            slot.worst_blocks = worst
            self._running.append(slot)
            if slot.leader is not None:
                self._release_prompt_blocks(slot.leader)

    def _build_batch(self) -> list[tuple[_Slot, np.ndarray, bool]]:
        """(slot, rows to evaluate, decode?) with the decode segments first, within max_batch_tokens."""
        decode, prompt = [], []
        budget = self.config.max_batch_tokens
        for slot in self._running:
            seq = slot.seq
            if seq.logits is not None or slot.run.done:
                continue
            n_past, L = seq.cache.n_past, len(seq.history)
            if n_past >= slot.prompt_len and L > n_past and budget > 0:
                rows = seq.history.view(n_past, min(L, n_past + budget))
                decode.append((slot, rows, True))
                budget -= len(rows)
        for slot in self._running:
            seq = slot.seq
            if seq.logits is not None or slot.run.done or budget <= 0:
                continue
            n_past = seq.cache.n_past
            if n_past < slot.prompt_len:
                if self._whole_prompts and slot.prompt_len - n_past > budget:
                    if decode or prompt:
                        continue   # the next step has room for it
                    budget = slot.prompt_len - n_past
                rows = seq.history.view(n_past, min(slot.prompt_len, n_past + budget))
                prompt.append((slot, rows, False))
                budget -= len(rows)
        return decode + prompt

    def _forward(self, batch: list[tuple[_Slot, np.ndarray, bool]]) -> None:
        need = 0
        for slot, rows, _ in batch:
            cache = slot.seq.cache
            need += self._blocks_for(cache.n_past + len(rows)) - len(cache.block_table) + 1
        if self.pool.free_blocks < need:
            self.prefix.evict(need - self.pool.free_blocks)
        logit_rows, owners, row = [], [], 0
        for slot, rows, is_decode in batch:
            row += len(rows)
            ends_prompt = not is_decode and slot.seq.cache.n_past + len(rows) == slot.prompt_len
            if is_decode or ends_prompt:
                logit_rows.append(row - 1)
                owners.append(slot)
        n_decode = sum(len(rows) for _, rows, d in batch if d)
        try:
            out = self.model.eval_batch([s.seq.cache for s, _, _ in batch], [rows for _, rows, _ in batch],
                                        logits=logit_rows, adapters=[s.seq.adapter_slot for s, _, _ in batch],
                                        batch_invariant=self.config.batch_invariant,
                                        decode_rows=n_decode if self.config.batch_invariant else 0).logits
        except KeyboardInterrupt:
            raise
        except Exception as exc:   # a bad request must not take the others down: end the batch's requests
            for slot, _, _ in batch:
                slot.run.finish("error")
                self._retire(slot, exc)
            return
        self.stats.update(steps=1, rows=row, decode_rows=n_decode, prompt_rows=row - n_decode)
        if self.config.prefix_cache:   # a long prompt's finished blocks are shareable before its last chunk
            for slot, _, is_decode in batch:
                cache = slot.seq.cache
                if not is_decode and not slot.registered and slot.leader is None and cache.n_past < slot.prompt_len:
                    self.prefix.add(slot.req.prompt[: cache.n_past], cache.block_table, self.config.block_size,
                                    slot.req.adapter_slot)
        for slot, logits in zip(owners, out):
            slot.seq.logits = logits
            if slot.seq.cache.n_past >= slot.prompt_len and slot.prompt_logits is None and slot.followers:
                slot.prompt_logits = logits.copy()
                slot.prompt_blocks = list(slot.seq.cache.block_table[: self._blocks_for(slot.prompt_len)])
                for block in slot.prompt_blocks:
                    self.pool.retain(block)
            if not slot.registered and slot.seq.cache.n_past >= slot.prompt_len:
                if self.config.prefix_cache:
                    self.prefix.add(slot.req.prompt, slot.seq.cache.block_table, self.config.block_size, slot.req.adapter_slot)
                slot.registered = True
            self._advance(slot)

    def _advance(self, slot: _Slot) -> None:
        """One token for the slot from its logits (or the end of its run), streamed to its request."""
        seq, run = slot.seq, slot.run
        try:
            events = run.step()
        except Exception as exc:
            run.finish("error")
            self._retire(slot, exc)
            return
        seq.logits = None
        if seq.cache.n_past == 0 and len(seq.history) > 1:   # the context slid: its window is a new prompt
            slot.prompt_len = len(seq.history)
        for ev in events:
            if ev[0] is not None and run.logprobs is not None:
                slot.req.token_logprobs.append(run.logprobs[len(slot.req.token_logprobs)])
            slot.req._put(ev)
        if run.done:
            self._retire(slot)

    def _retire(self, slot: _Slot, error: Optional[BaseException] = None) -> None:
        if slot in self._running:
            self._running.remove(slot)
        result = slot.run.result() if slot.run is not None else None
        if slot.seq is not None:
            slot.seq.cache = None   # its blocks go back to the pool (shared prefix blocks stay cached)
        slot.req._finish(result, error)
        for f in slot.followers:   # forks still waiting for this prompt start on their own
            if f.leader is slot and slot.prompt_logits is None:
                f.leader = None


def run_batch(model: "EngineModel", prompts: Seq, configs: Seq[GenerateConfig],
              config: Optional[SchedulerConfig] = None) -> list[GenerationResult]:
    """Every prompt through a scheduler (no thread) whose KV pool is sized by what they may need at
    most, capped by config.kv_budget_mb (beyond it requests take turns); results in prompt order."""
    check_model(model)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise InvalidArgumentError("prompts must be a list of prompts")
    if not isinstance(configs, (list, tuple)) or len(prompts) != len(configs):
        raise InvalidArgumentError("one config per prompt is needed")
    if not all(isinstance(c, GenerateConfig) for c in configs):
        raise InvalidArgumentError("configs must be GenerateConfig objects")
    if not prompts:
        return []
    cfg = config or SchedulerConfig()
    ids = [as_ids(model, p, first=True) for p in prompts]
    if not all(ids):
        raise InvalidArgumentError("a prompt in the batch is empty")
    blocks = 0
    for p, c in zip(ids, configs):
        capacity = min(c.context.max_seq_len or model.n_ctx, model.n_ctx)
        blocks += (min(capacity, len(p) + c.stopping.max_new_tokens) + cfg.block_size - 1) // cfg.block_size + 2
    per_block_mb = model.kv_cache_bytes(cfg.block_size, cfg.spec) / 2**20
    budget = min(cfg.kv_budget_mb, blocks * per_block_mb * 1.001)
    sched = Scheduler(model, SchedulerConfig(**{**cfg.__dict__, "kv_budget_mb": budget, "max_running": len(ids)}))
    requests = [sched.submit(p, c)[0] for p, c in zip(ids, configs)]
    try:
        sched.run_until_done()
    finally:
        sched.close()
    return [r.wait() for r in requests]
