"""Batched generation: the prompts go through a Scheduler (continuous batching over a KV pool sized
by what they may need), every step one forward pass over all unfinished sequences."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence as Seq

from .config import GenerateConfig
from .result import GenerationResult
from .scheduler import run_batch

if TYPE_CHECKING:
    from ..engine.model import EngineModel


def generate_batch(model: "EngineModel", prompts: Seq, configs: Seq[GenerateConfig]) -> list[GenerationResult]:
    """Generates for several prompts at once, each with its own config (sampling parameters, seed,
    limits); returns one GenerationResult per prompt, in order. A prompt's tokens are the same as
    it would get alone through a scheduler."""
    return run_batch(model, list(prompts) if isinstance(prompts, tuple) else prompts,
                     list(configs) if isinstance(configs, tuple) else configs)
