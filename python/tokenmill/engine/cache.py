"""How a KV cache stores keys and values: `CacheSpec` (kinds for K and V, an fp16 ring for the newest
tokens, fp16 for the first layers, a local attention window). The automatic, quality-gated choice
between specs is `tokenmill.generation.cache_plan`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError
from . import native

CACHE_KINDS = ("fp32", "fp16", "bf16", "q8", "q4", "nf4")


@dataclass(frozen=True)
class CacheSpec:
    """How a KV cache stores keys and values."""

    k_kind: str = "fp32"
    v_kind: str = "fp32"
    residual_len: int = 0          # newest tokens kept in fp16 (only where a kind is below fp16)
    fp16_prefix_layers: int = 0    # first layers stored as fp16 whatever the kinds
    local_window: int = 0          # attend to at most the last W positions; 0 = all

    def __post_init__(self):
        for name in ("k_kind", "v_kind"):
            if getattr(self, name) not in CACHE_KINDS:
                raise InvalidArgumentError(f"{name} must be one of {', '.join(CACHE_KINDS)}, got {getattr(self, name)!r}")
        for name in ("residual_len", "fp16_prefix_layers", "local_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise InvalidArgumentError(f"{name} must be an integer >= 0, got {value!r}")

    @property
    def label(self) -> str:
        return self.k_kind if self.k_kind == self.v_kind else f"{self.k_kind}/{self.v_kind}"

    def native(self):
        """The native configuration (for tokenmill.engine only)."""
        return native.kv_config(self.k_kind, self.v_kind, int(self.residual_len), int(self.fp16_prefix_layers),
                                int(self.local_window))

    def cache_bytes(self, model, capacity: int) -> int:
        """Bytes a full cache of `capacity` tokens holds (main stores plus the fp16 ring)."""
        return model.kv_cache_bytes(capacity, self)
