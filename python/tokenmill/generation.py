"""Generation: `GenerateConfig`, the stateful `Generator` (a conversation whose KV cache persists
across calls), the stateless `generate()`, and batched generation.

Every path runs the same per-sequence state machine (`_Sequence`): tokens waiting to be evaluated,
the logits of the next position, sampling, EOS / stop-string / length rules, and the result. A batch
is several of them evaluated together, one forward pass per step (`_evaluate`)."""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from . import _core
from .errors import ContextOverflowError, InvalidArgumentError, TokenmillError
from .kvcache import CACHE_KINDS, CachePlan, CacheSpec, select_cache_plan
from .tokenizer import StreamDecoder

if TYPE_CHECKING:
    from .model import Model

OVERFLOW_MODES = ("error", "truncate", "slide")
DECODE_PLANS = ("auto", "fixed", "none")


@dataclass
class GenerateConfig:
    """Generation settings (names follow the seed `GenerateConfig`).

    Sampling: temperature (0 = greedy), top_k (0 = off), top_p, min_p, typical_p,
    repetition_penalty (HF rule) over the last repeat_last_n tokens (-1 = all, prompt included),
    presence_penalty, frequency_penalty, logit_bias {token: bias}, seed (None = fresh entropy).
    Stopping: eos_token_id (int or list; None = the model's), ignore_eos, stop strings,
    max_new_tokens, and the context max_seq_len (None = the model's context) with
    context_overflow: "error" (an input that does not fit raises; generation stops when the
    context is full), "truncate" (drop the oldest tokens so the input fits and leaves room for
    max_new_tokens, up to half the context), "slide" (whenever the context is full, keep its last
    max_seq_len - 1 tokens and recompute their cache, so generation never stops for lack of room,
    as the seed's sliding window does; each slide costs a prefill of the window).
    logprobs: None, or the number n of top alternatives to report with each chosen token's
    log-probability (0 = only the chosen token).

    KV cache: cache_kind "fp32" | "fp16" | "bf16" | "q8" | "q4" | "nf4" | "auto" (cache_kind_k /
    cache_kind_v override it per tensor), cache_residual_len newest tokens kept in fp16,
    cache_fp16_prefix_layers first layers in fp16. "auto" picks a kind under cache_budget_mb (MB
    for max_seq_len tokens) that passes the quality gates (cache_quality_*) on a calibration text
    (cache_quality_text, default: shipped Shakespeare), the fastest by a micro-benchmark when
    cache_auto_benchmark (the smallest of those within 5 % of it); the plan persists in
    cache_plan_path and is re-measured after cache_plan_probe_interval_sec if cache_plan_probe (see
    tokenmill.kvcache).

    decode_plan: "none" evaluates a prompt in one pass with full attention; "fixed" evaluates
    prompts in chunks of decode_q_chunk tokens and restricts attention to the last
    decode_local_window positions (0 = no limit); "auto" picks by context length (max_seq_len):
    up to decode_bucket_short as "none", up to decode_bucket_mid chunked, beyond that chunked and
    windowed. A local window changes results once the context outgrows it (tokens further back
    are no longer seen, as in Mistral's sliding window); chunking does not."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 64
    logit_bias: Optional[Mapping[int, float]] = None
    seed: Optional[int] = None
    eos_token_id: Union[int, Sequence[int], None] = None
    ignore_eos: bool = False
    stop: Union[str, Sequence[str], None] = None
    max_seq_len: Optional[int] = None
    context_overflow: str = "error"
    logprobs: Optional[int] = None
    # KV cache
    cache_kind: str = "fp32"
    cache_kind_k: Optional[str] = None
    cache_kind_v: Optional[str] = None
    cache_budget_mb: Optional[float] = None
    cache_residual_len: int = 0
    cache_fp16_prefix_layers: int = 0
    cache_quality_max_delta_nll: float = 0.05
    cache_quality_max_ppl_ratio: float = 1.05
    cache_quality_max_mean_kl: float = 0.05
    cache_quality_min_top1: float = 0.9
    cache_quality_prompt_len: int = 256
    cache_quality_decode_steps: int = 32
    cache_quality_text: Optional[str] = None
    cache_auto_benchmark: bool = True
    cache_auto_bench_steps: int = 8
    cache_auto_bench_prompt_len: int = 64
    cache_plan_path: Optional[str] = None
    cache_plan_probe: bool = True
    cache_plan_probe_interval_sec: float = 3600.0
    # attention plan
    decode_plan: str = "auto"
    decode_bucket_short: int = 512
    decode_bucket_mid: int = 2048
    decode_q_chunk: int = 256
    decode_local_window: int = 0

    def __post_init__(self):
        self.validate()

    def replace(self, **changes: Any) -> "GenerateConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown generation parameter(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        _integer("max_new_tokens", self.max_new_tokens, 0)
        _integer("repeat_last_n", self.repeat_last_n, -1)
        _integer("top_k", self.top_k, 0)
        _number("temperature", self.temperature, lo=0.0)
        _number("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _number("min_p", self.min_p, lo=0.0, hi=1.0)
        _number("typical_p", self.typical_p, lo=0.0, hi=1.0, lo_open=True)
        _number("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        _number("presence_penalty", self.presence_penalty)
        _number("frequency_penalty", self.frequency_penalty)
        if self.seed is not None:
            _integer("seed", self.seed, 0)
        if self.max_seq_len is not None:
            _integer("max_seq_len", self.max_seq_len, 2)
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, 0)
        if self.context_overflow not in OVERFLOW_MODES:
            raise InvalidArgumentError(
                f"context_overflow must be one of {', '.join(OVERFLOW_MODES)}, got {self.context_overflow!r}"
            )
        self.stop_strings()
        self.eos_ids(None)
        kinds = CACHE_KINDS + ("auto",)
        for name in ("cache_kind", "cache_kind_k", "cache_kind_v"):
            value = getattr(self, name)
            if (value is not None or name == "cache_kind") and value not in kinds:
                raise InvalidArgumentError(f"{name} must be one of {', '.join(kinds)}, got {value!r}")
        if "auto" in (self.cache_kind_k, self.cache_kind_v):
            raise InvalidArgumentError("'auto' applies to cache_kind as a whole, not to cache_kind_k / cache_kind_v")
        if self.cache_budget_mb is not None:
            _number("cache_budget_mb", self.cache_budget_mb, lo=0.0, lo_open=True)
        for name in ("cache_residual_len", "cache_fp16_prefix_layers", "decode_local_window"):
            _integer(name, getattr(self, name), 0)
        for name in ("cache_quality_prompt_len", "cache_quality_decode_steps", "cache_auto_bench_steps",
                     "cache_auto_bench_prompt_len", "decode_bucket_short", "decode_bucket_mid", "decode_q_chunk"):
            _integer(name, getattr(self, name), 1)
        _number("cache_quality_max_delta_nll", self.cache_quality_max_delta_nll)
        _number("cache_quality_max_ppl_ratio", self.cache_quality_max_ppl_ratio, lo=1.0)
        _number("cache_quality_max_mean_kl", self.cache_quality_max_mean_kl, lo=0.0)
        _number("cache_quality_min_top1", self.cache_quality_min_top1, lo=0.0, hi=1.0)
        _number("cache_plan_probe_interval_sec", self.cache_plan_probe_interval_sec, lo=0.0)
        if self.cache_quality_text is not None and not isinstance(self.cache_quality_text, str):
            raise InvalidArgumentError("cache_quality_text must be a string (the calibration text itself)")
        if self.cache_plan_path is not None and not isinstance(self.cache_plan_path, (str, os.PathLike)):
            raise InvalidArgumentError("cache_plan_path must be a path")
        if self.decode_plan not in DECODE_PLANS:
            raise InvalidArgumentError(f"decode_plan must be one of {', '.join(DECODE_PLANS)}, got {self.decode_plan!r}")
        if self.decode_bucket_mid < self.decode_bucket_short:
            raise InvalidArgumentError("decode_bucket_mid must be >= decode_bucket_short")
        if self.logit_bias is not None and not isinstance(self.logit_bias, Mapping):
            raise InvalidArgumentError("logit_bias must be a mapping {token_id: bias}")

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise InvalidArgumentError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in stops):
            raise InvalidArgumentError("stop strings must not be empty")
        return list(stops)

    def eos_ids(self, model_eos: Optional[Sequence[int]]) -> set[int]:
        if self.ignore_eos:
            return set()
        value = self.eos_token_id
        if value is None:
            return set(model_eos or [])
        values = [value] if isinstance(value, (int, np.integer)) else value
        if isinstance(values, (str, bytes)) or not all(isinstance(v, (int, np.integer)) for v in values):
            raise InvalidArgumentError(f"eos_token_id must be an int or a list of ints, got {value!r}")
        return {int(v) for v in values if v >= 0}   # -1 disables, as in the CLI

    def sampler_params(self) -> "_core.SamplerParams":
        p = _core.SamplerParams()
        p.temperature = float(self.temperature)
        p.top_k = int(self.top_k)
        p.top_p = float(self.top_p)
        p.min_p = float(self.min_p)
        p.typical_p = float(self.typical_p)
        p.repetition_penalty = float(self.repetition_penalty)
        p.presence_penalty = float(self.presence_penalty)
        p.frequency_penalty = float(self.frequency_penalty)
        p.repeat_last_n = int(self.repeat_last_n)
        p.logit_bias = [(int(k), float(v)) for k, v in (self.logit_bias or {}).items()]
        p.seed = (secrets.randbits(64) if self.seed is None else int(self.seed)) & (2**64 - 1)
        return p


def _number(name, value, lo=None, hi=None, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise InvalidArgumentError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise InvalidArgumentError(f"{name} must be <= {hi}, got {value}")


def _integer(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise InvalidArgumentError(f"{name} must be an integer >= {lo}, got {value!r}")


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)   # (token, logprob), most likely first


@dataclass
class GenerationResult:
    """What one generation produced and how. finish_reason: "eos", "stop" (a stop string),
    "length" (max_new_tokens), "context" (the context is full) or "cancelled" (the caller stopped
    iterating)."""

    token_ids: list[int]
    text: Optional[str]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float
    logprobs: Optional[list[TokenLogprob]] = None

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # the first new token comes out of the prefill; each later one costs one decode step
        steps = max(self.completion_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


class _Sequence:
    """One sequence: its cache and token history, its sampler, and the rules that end it."""

    def __init__(self, model: "Model", config: GenerateConfig):
        self.model = model
        self.config = config
        self.capacity = min(config.max_seq_len or model.n_ctx, model.n_ctx)
        self.cache_plan = _cache_plan(model, config, self.capacity)
        self.q_chunk, local_window = _attention_plan(config, self.capacity)
        spec = CacheSpec(self.cache_plan.k_kind, self.cache_plan.v_kind, config.cache_residual_len,
                         config.cache_fp16_prefix_layers, local_window)
        self.cache = model.new_cache(self.capacity, spec)
        self.history: list[int] = []       # every token in the context, evaluated or not
        self.logits: Optional[np.ndarray] = None   # next-token logits after history (when evaluated)
        self.sampler = _core.Sampler(config.sampler_params(), model.n_vocab)

    # ---- context bookkeeping
    @property
    def pending(self) -> list[int]:
        """Tokens in the history that the cache has not seen yet."""
        return self.history[self.cache.n_past :]

    def extend(self, ids: Sequence[int], room: int) -> None:
        """Appends input ids, applying the overflow policy so that `room` new tokens still fit."""
        ids = [int(t) for t in ids]
        vocab = self.model.n_vocab
        bad = [t for t in ids if t < 0 or t >= vocab]
        if bad:
            raise InvalidArgumentError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        total = len(self.history) + len(ids)
        if total + min(room, 1) > self.capacity:
            mode = self.config.context_overflow
            if mode == "error":
                raise ContextOverflowError(
                    f"the input needs {total} tokens (+{min(room, 1)} to generate) but max_seq_len is {self.capacity}; "
                    "use context_overflow='truncate' or 'slide' to drop the oldest tokens"
                )
            reserve = 1 if mode == "slide" else max(min(room, self.capacity // 2), 1)
            keep = self.capacity - reserve
            self._replace_history((self.history + ids)[-keep:])
            return
        self.history.extend(ids)
        if ids:
            self.logits = None

    def _replace_history(self, tokens: list[int]) -> None:
        """Starts the cache over with `tokens` (positions change, so nothing cached is reusable)."""
        self.cache.truncate(0)
        self.history = list(tokens)
        self.logits = None

    def make_room(self) -> bool:
        """Before adding a token: False if the context is full and the policy says stop."""
        if len(self.history) < self.capacity:
            return True
        if self.config.context_overflow != "slide":
            return False
        self._replace_history(self.history[-(self.capacity - 1) :])
        return True

    def rollback(self, n: int) -> None:
        if not isinstance(n, int) or n < 0 or n > len(self.history):
            raise InvalidArgumentError(f"cannot roll back {n!r} of {len(self.history)} tokens")
        if n == 0:
            return
        del self.history[len(self.history) - n :]
        # keep at least the last token pending so its logits are recomputed on the next step
        self.cache.truncate(min(self.cache.n_past, max(len(self.history) - 1, 0)))
        self.logits = None

    def append(self, token: int) -> None:
        """Adds a sampled token to the context (evaluated on the next step)."""
        self.history.append(token)
        self.logits = None

    # ---- sampling
    def sample(self) -> int:
        history = np.asarray(self.history, dtype=np.int32)
        return int(self.sampler.sample(self.logits, history))

    def logprob(self, token: int, top_n: int) -> TokenLogprob:
        """Log-probability of `token` under the model's own distribution (before sampling filters)."""
        z = self.logits.astype(np.float64)
        logp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
        top = []
        if top_n > 0:
            idx = np.argpartition(-logp, min(top_n, logp.size - 1))[:top_n]
            idx = idx[np.argsort(-logp[idx], kind="stable")]
            top = [(int(i), float(logp[i])) for i in idx]
        return TokenLogprob(token, float(logp[token]), top)


def _cache_plan(model: "Model", config: GenerateConfig, capacity: int) -> CachePlan:
    if config.cache_kind == "auto":
        return select_cache_plan(model, config, capacity)
    return CachePlan(config.cache_kind_k or config.cache_kind, config.cache_kind_v or config.cache_kind, "fixed")


def _attention_plan(config: GenerateConfig, context: int) -> tuple[Optional[int], int]:
    """(prompt chunk length or None for one pass, local attention window or 0) for decode_plan."""
    plan = config.decode_plan
    if plan == "none" or (plan == "auto" and context <= config.decode_bucket_short):
        return None, 0
    if plan == "auto" and context <= config.decode_bucket_mid:
        return config.decode_q_chunk, 0
    return config.decode_q_chunk, config.decode_local_window


def _evaluate(model: "Model", seqs: Sequence[_Sequence]) -> None:
    """Forward passes over every sequence's pending tokens (long ones first go through in chunks
    of their q_chunk, without logits); stores each one's next logits."""
    todo = [s for s in seqs if s.logits is None and s.history]
    if not todo:
        return
    for s in todo:
        if not s.pending:   # all cached but the logits were dropped: re-run the last token
            s.cache.truncate(len(s.history) - 1)
    while True:
        long = [s for s in todo if s.q_chunk and len(s.pending) > s.q_chunk]
        if not long:
            break
        model.native.eval_batch([s.cache for s in long], [np.asarray(s.pending[: s.q_chunk], dtype=np.int32) for s in long],
                                "none")
    tokens = [np.asarray(s.pending, dtype=np.int32) for s in todo]
    logits = model.native.eval_batch([s.cache for s in todo], tokens, "last")
    for s, row in zip(todo, logits):
        s.logits = row


class _Run:
    """One generation on one sequence: yields (token or None, text piece) events, applying EOS,
    stop strings (matched on text, across token boundaries, never emitted), max_new_tokens and
    the context limit, and fills in a GenerationResult."""

    def __init__(self, seq: _Sequence, config: GenerateConfig, prompt_tokens: int):
        self.seq = seq
        self.config = config
        self.sampler = seq.sampler
        self.eos = config.eos_ids(seq.model.eos_ids)
        self.stops = config.stop_strings()
        tok = seq.model.tokenizer
        if self.stops and tok is None:
            raise TokenmillError("stop strings need a tokenizer; this model has none")
        self.decoder = StreamDecoder(tok) if tok is not None else None
        self.held: list[tuple[int, str]] = []   # tokens not yet released (could start a stop string)
        self.tokens: list[int] = []
        self.texts: list[str] = []
        self.logprobs: Optional[list[TokenLogprob]] = [] if config.logprobs is not None else None
        self.finish_reason: Optional[str] = None
        self.prompt_tokens = prompt_tokens
        self.t_start = time.perf_counter()
        self.t_first: Optional[float] = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def step(self) -> list[tuple[Optional[int], str]]:
        """Samples one token from the sequence's current logits; returns released events."""
        seq = self.seq
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if len(self.tokens) + len(self.held) >= self.config.max_new_tokens:
            return self._finish("length")
        token = seq.sample()
        if token in self.eos:
            return self._finish("eos")
        if self.logprobs is not None:
            self.logprobs.append(seq.logprob(token, self.config.logprobs))
        seq.append(token)
        piece = self.decoder.push(token) if self.decoder else ""
        if not self.stops:
            self._release(token, piece)
            events = [(token, piece)]
        else:
            events = self._check_stops(token, piece)
        if not self.done and not seq.make_room():
            events += self._finish("context")
        return events

    def _release(self, token: Optional[int], piece: str) -> None:
        if token is not None:
            self.tokens.append(token)
        self.texts.append(piece)

    def _check_stops(self, token: int, piece: str) -> list[tuple[Optional[int], str]]:
        self.held.append((token, piece))
        text = "".join(p for _, p in self.held)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        events: list[tuple[Optional[int], str]] = []
        if hits:
            cut = min(hits)
            end = 0
            kept = 0
            for tok, p in self.held:   # whole tokens before the stop string are released
                if end + len(p) > cut:
                    break
                end += len(p)
                kept += 1
                events.append((tok, p))
            if cut > end:              # the stop string starts inside a token: its text up to there
                events.append((None, text[end:cut]))
            dropped = len(self.held) - kept
            self.held = []
            for tok, p in events:
                self._release(tok, p)
            self.seq.rollback(dropped)
            if self.logprobs is not None and dropped:
                del self.logprobs[len(self.logprobs) - dropped :]
            self.finish_reason = "stop"
            return events
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        release_to = len(text) - hold
        end = 0
        while self.held and end + len(self.held[0][1]) <= release_to:
            tok, p = self.held.pop(0)
            end += len(p)
            self._release(tok, p)
            events.append((tok, p))
        return events

    def _finish(self, reason: str) -> list[tuple[Optional[int], str]]:
        events = []
        for tok, p in self.held:   # held text that never became a stop string is real output
            self._release(tok, p)
            events.append((tok, p))
        self.held = []
        if self.decoder is not None:
            tail = self.decoder.flush()
            if tail:
                self._release(None, tail)
                events.append((None, tail))
        self.finish_reason = reason
        return events

    def result(self) -> GenerationResult:
        now = time.perf_counter()
        first = self.t_first or now
        return GenerationResult(
            token_ids=list(self.tokens),
            text="".join(self.texts) if self.decoder is not None else None,
            finish_reason=self.finish_reason or "length",
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.tokens),
            prefill_seconds=first - self.t_start,
            decode_seconds=now - first,
            logprobs=self.logprobs,
        )


def _as_ids(model: "Model", input_ids, first: bool) -> list[int]:
    if isinstance(input_ids, str):
        return model.tokenize(input_ids, add_special_tokens=first)
    if isinstance(input_ids, np.ndarray):
        input_ids = input_ids.tolist()
    if not isinstance(input_ids, (list, tuple)) or not all(isinstance(t, (int, np.integer)) for t in input_ids):
        raise InvalidArgumentError("input_ids must be a 1-D sequence of token ids (or a string)")
    return [int(t) for t in input_ids]


class Generator:
    """A conversation with a model: the KV cache persists across calls, so a second `generate`
    only evaluates the new tokens. Not thread-safe (one Generator per thread; a Model may be shared)."""

    def __init__(self, model: "Model", config: Optional[GenerateConfig] = None, **overrides: Any):
        self.model = model
        self.config = (config or GenerateConfig()).replace(**overrides)
        self._seq = _Sequence(model, self.config)
        self.last: Optional[GenerationResult] = None

    # ---- state
    @property
    def tokens(self) -> list[int]:
        """Every token in the context (inputs and generated)."""
        return list(self._seq.history)

    @property
    def n_cached(self) -> int:
        return self._seq.cache.n_past

    @property
    def cache_plan(self) -> CachePlan:
        """The KV cache kinds in use and, for cache_kind="auto", every candidate's measurements."""
        return self._seq.cache_plan

    @property
    def cache_bytes(self) -> int:
        return self._seq.cache.bytes

    def reset(self) -> None:
        self._seq._replace_history([])

    def rollback(self, n: int) -> None:
        """Removes the last n tokens from the context."""
        self._seq.rollback(n)

    def prefill(self, input_ids) -> None:
        """Appends input tokens to the context and evaluates them."""
        ids = _as_ids(self.model, input_ids, first=not self._seq.history)
        self._seq.extend(ids, room=1)
        _evaluate(self.model, [self._seq])

    def decode_step(self) -> int:
        """Samples the next token, appends it to the context and returns it (EOS included)."""
        seq = self._seq
        if not seq.history:
            raise InvalidArgumentError("the context is empty: prefill() first")
        if not seq.make_room():
            raise ContextOverflowError(f"the context is full ({seq.capacity} tokens)")
        _evaluate(self.model, [seq])
        token = seq.sample()
        seq.append(token)
        return token

    # ---- generation
    def generate_iter(self, input_ids=None, **overrides: Any) -> Iterator[int]:
        """Yields new token ids as they are generated; details land on `self.last`."""
        for token, _ in self._drive(self.start(input_ids, **overrides)):
            if token is not None:
                yield token

    def generate(self, input_ids=None, **overrides: Any) -> list[int]:
        """Continues the context with `input_ids` (ids or text) and returns the new token ids."""
        for _ in self._drive(self.start(input_ids, **overrides)):
            pass
        return list(self.last.token_ids)

    def start(self, input_ids=None, **overrides: Any) -> "_Run":
        """Checks the call and appends its input (errors surface here, before any iteration)."""
        fixed = {k for k in overrides if k.startswith(("cache_", "decode_")) or k == "max_seq_len"}
        if fixed:
            raise InvalidArgumentError(
                f"{', '.join(sorted(fixed))} shape the KV cache, which exists once the Generator is created; "
                "pass them to the Generator"
            )
        config = self.config.replace(**overrides)
        seq = self._seq
        ids = _as_ids(self.model, input_ids, first=not seq.history) if input_ids is not None else []
        if not ids and not seq.history:
            raise InvalidArgumentError("the prompt is empty")
        run = _Run(seq, config, prompt_tokens=len(ids))
        seq.extend(ids, room=config.max_new_tokens)
        if _SAMPLER_FIELDS & overrides.keys():
            run.sampler = _core.Sampler(config.sampler_params(), self.model.n_vocab)   # this call only
        return run

    def _drive(self, run: "_Run") -> Iterator[tuple[Optional[int], str]]:
        seq = self._seq
        saved_sampler, saved_config = seq.sampler, seq.config
        seq.sampler, seq.config = run.sampler, run.config
        self.last = None
        try:
            while not run.done:
                _evaluate(self.model, [seq])
                yield from run.step()
        finally:
            if not run.done:
                run._finish("cancelled")
            self.last = run.result()
            seq.sampler, seq.config = saved_sampler, saved_config


_SAMPLER_FIELDS = {
    "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "repeat_last_n", "logit_bias", "seed",
}


def generate(model: "Model", input_ids, config: Optional[GenerateConfig] = None, **overrides: Any):
    """Stateless generation: new token ids for one prompt (a list of ids), or one list per prompt
    for a batch (a list of lists), decoded together."""
    config = (config or GenerateConfig()).replace(**overrides)
    if isinstance(input_ids, np.ndarray) and input_ids.ndim == 2:
        input_ids = input_ids.tolist()
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple, np.ndarray)):
        return [r.token_ids for r in generate_batch(model, list(input_ids), [config] * len(input_ids))]
    return Generator(model, config).generate(input_ids)


def generate_batch(model: "Model", prompts: Sequence, configs: Sequence[GenerateConfig]) -> list[GenerationResult]:
    """Generates for several prompts at once: every step is one forward pass over all unfinished
    sequences (prompts of different lengths prefill together), and finished ones leave the batch.
    Each prompt has its own config (sampling parameters, seed, limits)."""
    if len(prompts) != len(configs):
        raise InvalidArgumentError("one config per prompt is needed")
    if not prompts:
        return []
    seqs, runs = [], []
    for prompt, config in zip(prompts, configs):
        seq = _Sequence(model, config)
        ids = _as_ids(model, prompt, first=True)
        if not ids:
            raise InvalidArgumentError("a prompt in the batch is empty")
        seq.extend(ids, room=config.max_new_tokens)
        seqs.append(seq)
        runs.append(_Run(seq, config, prompt_tokens=len(ids)))
    active = list(range(len(seqs)))
    while active:
        _evaluate(model, [seqs[i] for i in active])
        for i in active:
            runs[i].step()
        active = [i for i in active if not runs[i].done]
    return [r.result() for r in runs]
