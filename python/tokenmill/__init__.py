"""tokenmill: a native LLM inference engine with a Python API.

    import tokenmill
    m = tokenmill.load()                      # the default model (SmolLM2-135M-Instruct)
    print(m.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0))

Subpackages by role: `engine` (the native core's owning wrappers: models, caches, forward passes),
`generation` (configuration, Generator, batches), `text` (tokenizers, streaming, chat templates),
`tools` (CLI, benchmarks, conversion); `tokenmill.api` is the friendly layer re-exported here."""

from . import errors
from .api import Model, load
from .engine.cache import CacheSpec
from .engine.default_model import pull
from .engine.model import load_tokenizer
from .errors import (
    ConcurrentUseError,
    ConfigError,
    ContextOverflowError,
    InvalidArgumentError,
    KVPoolFullError,
    DeviceError,
    ModelFileError,
    ModelFormatError,
    ModelNotFoundError,
    NumericalError,
    TokenmillError,
    UnknownParameterError,
    UnsupportedModelError,
)
from .generation import (
    CacheConfig,
    ContextConfig,
    GenerateConfig,
    GenerationResult,
    Generator,
    PrefillConfig,
    SamplingConfig,
    Scheduler,
    SchedulerConfig,
    SpeculativeConfig,
    SpeculativeGenerator,
    SpeculativeStats,
    StoppingConfig,
    TokenLogprob,
    generate,
)
from .text.chat import ChatTemplateError
from .text.tokenizer import Tokenizer
from .engine.adapters import AdapterInfo
from .tools.export import export_to_gguf, quantize_full_model
from .tools.merge import merge_adapter
from .pipelines.inferencer import ConfigManager, Inferencer, InferencerConfig
from . import memory

__version__ = "0.1.0"

__all__ = [
    "memory",
    "AdapterInfo",
    "CacheConfig",
    "CacheSpec",
    "ChatTemplateError",
    "ConcurrentUseError",
    "ConfigError",
    "ConfigManager",
    "ContextConfig",
    "ContextOverflowError",
    "GenerateConfig",
    "GenerationResult",
    "Generator",
    "Inferencer",
    "InferencerConfig",
    "InvalidArgumentError",
    "KVPoolFullError",
    "DeviceError",
    "Model",
    "ModelFileError",
    "ModelFormatError",
    "ModelNotFoundError",
    "NumericalError",
    "PrefillConfig",
    "SamplingConfig",
    "Scheduler",
    "SchedulerConfig",
    "SpeculativeConfig",
    "SpeculativeGenerator",
    "SpeculativeStats",
    "StoppingConfig",
    "Tokenizer",
    "TokenLogprob",
    "TokenmillError",
    "UnknownParameterError",
    "UnsupportedModelError",
    "errors",
    "export_to_gguf",
    "generate",
    "load",
    "load_tokenizer",
    "merge_adapter",
    "pull",
    "quantize_full_model",
]
