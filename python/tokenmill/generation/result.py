"""What a generation produced: `GenerationResult` and per-token `TokenLogprob`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)   # (token, logprob), most likely first


@dataclass
class GenerationResult:
    """What one generation produced and how. finish_reason: "eos", "stop" (a stop string),
    "length" (max_new_tokens), "context" (the context is full) or "cancelled" (the caller stopped
    iterating, or Ctrl-C)."""

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
