"""What a generation produced: `GenerationResult` and per-token `TokenLogprob`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class SpeculativeStats:
    """What speculative decoding did in one generation: drafted tokens proposed and accepted, the
    verification steps, the k of each step, tokens decoded plainly (no draft, or acceptance too low),
    and the time spent drafting and verifying."""

    proposed: int = 0
    accepted: int = 0
    steps: int = 0
    k_per_step: list[int] = field(default_factory=list)
    plain_tokens: int = 0
    early_resumes: int = 0   # fallbacks that prompt lookup's shadow drafts ended early
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


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
    speculative: Optional[SpeculativeStats] = None

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # the first new token comes out of the prefill; each later one costs one decode step
        steps = max(self.completion_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0
