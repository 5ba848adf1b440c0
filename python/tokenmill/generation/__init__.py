"""Generation on top of the engine: configuration (grouped, seed names flat), the per-sequence state
machine, the stateful Generator, batches, and the automatic KV cache plan."""

from .batch import generate_batch
from .cache_plan import CachePlan, CandidateReport, select_cache_plan
from .config import (
    CacheConfig,
    ContextConfig,
    GenerateConfig,
    PrefillConfig,
    SamplingConfig,
    StoppingConfig,
)
from .generator import Generator, generate
from .result import GenerationResult, TokenLogprob

__all__ = [
    "CacheConfig",
    "CachePlan",
    "CandidateReport",
    "ContextConfig",
    "GenerateConfig",
    "GenerationResult",
    "Generator",
    "PrefillConfig",
    "SamplingConfig",
    "StoppingConfig",
    "TokenLogprob",
    "generate",
    "generate_batch",
    "select_cache_plan",
]
