"""One generation on one sequence (`Run`): samples a token per step and applies EOS, stop strings
(matched on text across token boundaries, never emitted), max_new_tokens and the context limit,
yielding (token or None, text piece) events and filling in a GenerationResult."""

from __future__ import annotations

import time
from typing import Optional

from ..errors import TokenmillError
from ..text.stream import StreamDecoder
from .config import GenerateConfig
from .constraints import build_constraint
from .result import GenerationResult, TokenLogprob
from .sequence import Sequence, token_logprob

Event = tuple[Optional[int], str]


class Run:
    def __init__(self, seq: Sequence, config: GenerateConfig, prompt_tokens: int, sampler=None):
        self.seq = seq
        self.config = config
        self.sampler = sampler or seq.sampler
        self.eos = config.eos_ids(seq.model.eos_ids)
        self.stops = config.stop_strings()
        self.max_new_tokens = config.stopping.max_new_tokens
        self.top_logprobs = config.sampling.logprobs
        tok = seq.model.tokenizer
        if self.stops and tok is None:
            raise TokenmillError("stop strings need a tokenizer; this model has none")
        self.decoder = StreamDecoder(tok) if tok is not None else None
        self.held: list[Event] = []   # tokens not yet released (could start a stop string)
        self.tokens: list[int] = []
        self.texts: list[str] = []
        self.logprobs: Optional[list[TokenLogprob]] = [] if self.top_logprobs is not None else None
        self.speculative = None   # SpeculativeStats when a SpeculativeGenerator drives the run
        self.constraint = build_constraint(tok, sorted(self.eos) or seq.model.eos_ids,
                                           config.sampling.json_schema, config.sampling.regex)
        self.finish_reason: Optional[str] = None
        self.prompt_tokens = prompt_tokens
        self.t_start = time.perf_counter()
        self.t_first: Optional[float] = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def limit_reached(self) -> bool:
        """max_new_tokens are out: the run ends without evaluating its last token."""
        return len(self.tokens) + len(self.held) >= self.max_new_tokens

    def step(self) -> list[Event]:
        """Samples one token from the sequence's current logits (or ends at max_new_tokens);
        returns released events."""
        seq = self.seq
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if self.limit_reached():
            return self.finish("length")
        allowed = self.constraint.allowed() if self.constraint is not None else None
        return self.push(seq.sample(self.sampler, allowed), seq.logits)

    def push(self, token: int, logits) -> list[Event]:
        """A new token drawn from `logits` (the next-token logits of the context): EOS, logprobs,
        the context, stop strings. Speculative decoding pushes several per step."""
        seq = self.seq
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if token in self.eos:
            return self.finish("eos")
        if self.logprobs is not None:
            self.logprobs.append(token_logprob(logits, token, self.top_logprobs))
        if self.constraint is not None:
            self.constraint.advance(token)
        seq.append(token)
        piece = self.decoder.push(token) if self.decoder else ""
        if not self.stops:
            self._release(token, piece)
            events = [(token, piece)]
        else:
            events = self._check_stops(token, piece)
        if not self.done and not seq.make_room():
            events += self.finish("context")
        return events

    def _release(self, token: Optional[int], piece: str) -> None:
        if token is not None:
            self.tokens.append(token)
        self.texts.append(piece)

    def _check_stops(self, token: int, piece: str) -> list[Event]:
        self.held.append((token, piece))
        text = "".join(p for _, p in self.held)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        events: list[Event] = []
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

    def finish(self, reason: str) -> list[Event]:
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
            speculative=self.speculative,
        )
