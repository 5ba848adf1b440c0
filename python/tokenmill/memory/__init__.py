"""Memory-augmented models (the memory-transformer seed's inference API): load one with
`tokenmill.load(base, memory=CHECKPOINT_DIR)`, choose its routing with `model.set_routing(...)`, and
use these: generate / generate_batch, the inference routers, and the deployment tools. The memory
math runs in the native core (cpp/model/memory.h)."""

from ..engine.memory import STRATEGIES, MemorySettings
from .generate import generate, generate_batch
from .routing import (ChapterRouter, HybridRouter, RollingWindowRouter, SequenceLevelRouter, TokenLevelRouter,
                      create_inference_router)
from .tools import (export_to_gguf, extract_memory_weights, merge_adapter_weights, quantize_full_model,
                    quantize_memory_for_deployment)

__all__ = ["STRATEGIES", "MemorySettings", "generate", "generate_batch", "ChapterRouter", "HybridRouter",
           "RollingWindowRouter", "SequenceLevelRouter", "TokenLevelRouter", "create_inference_router",
           "export_to_gguf", "extract_memory_weights", "merge_adapter_weights", "quantize_full_model",
           "quantize_memory_for_deployment"]
