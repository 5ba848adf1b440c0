"""Generation on top of the engine: configuration (grouped, seed names flat), the per-sequence state
machine, the stateful Generator, batches, and the automatic KV cache plan."""

from .batch import generate_batch
from .cache_plan import CachePlan, CandidateReport, select_cache_plan
from .config import (
    CacheConfig,
    ContextConfig,
    GenerateConfig,
    ModelOptions,
    PrefillConfig,
    SamplingConfig,
    SpeculativeConfig,
    SpeculativeOptions,
    StoppingConfig,
)
from .generator import Generator, generate
from .result import GenerationResult, SpeculativeStats, TokenLogprob
from .scheduler import Request, Scheduler, SchedulerConfig
from .speculative import SpeculativeGenerator

__all__ = [
    "CacheConfig",
    "CachePlan",
    "CandidateReport",
    "ContextConfig",
    "GenerateConfig",
    "GenerationResult",
    "Generator",
    "ModelOptions",
    "PrefillConfig",
    "Request",
    "SamplingConfig",
    "Scheduler",
    "SchedulerConfig",
    "SpeculativeConfig",
    "SpeculativeGenerator",
    "SpeculativeOptions",
    "SpeculativeStats",
    "StoppingConfig",
    "TokenLogprob",
    "generate",
    "generate_batch",
    "select_cache_plan",
]
