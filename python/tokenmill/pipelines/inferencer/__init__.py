"""The batch Inferencer (seed 001): TOML config, local datasets, continuous batching, resumable JSONL,
and the same job on Ray Data."""

from .config import ConfigManager, InferencerConfig
from .inferencer import Inferencer, PreparedRow

__all__ = ["ConfigManager", "Inferencer", "InferencerConfig", "PreparedRow"]
