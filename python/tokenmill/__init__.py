"""tokenmill: a native LLM inference engine with a Python API.

    import tokenmill
    m = tokenmill.load()                      # the default model (SmolLM2-135M-Instruct)
    print(m.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0))
"""

from . import errors
from .default_model import pull
from .errors import (
    ContextOverflowError,
    InvalidArgumentError,
    ModelFileError,
    ModelFormatError,
    ModelNotFoundError,
    TokenmillError,
    UnsupportedModelError,
)
from .generation import GenerateConfig, GenerationResult, Generator, TokenLogprob, generate
from .model import Model, load, load_tokenizer
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "ContextOverflowError",
    "GenerateConfig",
    "GenerationResult",
    "Generator",
    "InvalidArgumentError",
    "Model",
    "ModelFileError",
    "ModelFormatError",
    "ModelNotFoundError",
    "Tokenizer",
    "TokenmillError",
    "UnsupportedModelError",
    "TokenLogprob",
    "errors",
    "generate",
    "load",
    "load_tokenizer",
    "pull",
]
