"""Exceptions raised by tokenmill. Every error the native core reports arrives as one of these."""


class TokenmillError(Exception):
    """Base class of all tokenmill errors."""


class ModelFormatError(TokenmillError, ValueError):
    """A model file is corrupt, truncated or malformed."""


class UnsupportedModelError(TokenmillError, ValueError):
    """A well-formed model that tokenmill cannot run (architecture, tensor type, version)."""


class InvalidArgumentError(TokenmillError, ValueError):
    """An argument is out of range."""


class ContextOverflowError(TokenmillError, ValueError):
    """A prompt or generation does not fit the context window."""


class ModelFileError(TokenmillError, OSError):
    """A model file cannot be opened or mapped."""


class ModelNotFoundError(TokenmillError, FileNotFoundError):
    """The requested (or default) model is not available locally and cannot be fetched."""


class NumericalError(TokenmillError, ValueError):
    """NaN or infinite values where numbers are needed (model outputs, input embeddings)."""


class UnknownParameterError(TokenmillError, TypeError):
    """A keyword that no function or configuration of tokenmill takes (a misspelt parameter)."""


class KVPoolFullError(TokenmillError, RuntimeError):
    """A KV pool has no free block left, or a request needs more blocks than the whole pool holds
    (a scheduler makes requests wait for blocks, so only the second reaches its users)."""


class DeviceError(TokenmillError, RuntimeError):
    """The GPU runtime failed: out of device memory, a kernel launch error, a lost device (the
    runtime's own message is quoted)."""


class ConcurrentUseError(TokenmillError, RuntimeError):
    """An object that serves one caller at a time (a Generator, a KV cache) was used by two at once."""


class ConfigError(TokenmillError, ValueError):
    """A configuration file or value is invalid: an unknown key, a wrong type, a missing variable."""
