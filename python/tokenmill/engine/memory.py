"""Memory-augmented models: the memory-transformer trainer's memory layers over a frozen base model,
run by the native core (cpp/model/memory.h has the math and the routing strategies).

A checkpoint is a directory as the trainer writes it: `config.yaml` (its `memory:` section) and
`model.safetensors` with the trainer's parameter names (`memory_banks.{i}...`, `routers.{L}.router.*`,
`memory_adapters.{L}.memory_layernorm.weight`, `memory_adapters.{L}.memory_attn.*`); anything before
those names (a wrapper's prefix) is ignored, and so are the frozen base model's own tensors. `model.pt`
(pickle) is never read. The same tensors and settings also travel inside a GGUF written by
`tokenmill.memory.export_to_gguf` (key `tokenmill.memory.config`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np

from ..errors import ConfigError, InvalidArgumentError, ModelFileError, ModelFormatError, UnsupportedModelError
from . import native

STRATEGIES = ("sequence", "rolling", "token", "hybrid")
GGUF_CONFIG_KEY = "tokenmill.memory.config"
QUANT_BITS = {32: "f32", 8: "int8", 4: "int4"}
_ROOTS = ("memory_banks.", "routers.", "memory_adapters.")
_PROJECTIONS = ("q", "k", "v", "o")

PathLike = Union[str, os.PathLike]


@dataclass
class MemorySettings:
    """The memory section of a trainer config, resolved against the base model."""

    num_memory_tokens: int
    layers: list                      # decoder layers followed by a memory layer
    bank_of_layer: dict               # layer -> bank index
    n_heads: int
    n_kv_heads: int
    head_dim: int
    use_chapters: bool = False
    num_chapters: int = 0
    top_k_chapters: int = 0
    num_shared_chapters: int = 0
    routed_scaling_factor: float = 1.0
    normalize_shared_routed_before_mixing: bool = False
    shared_routed_norm_type: str = "rms"
    shared_routed_norm_eps: float = 1e-6
    routing_strategy_inference: str = "sequence"
    routing_window_size: int = 128
    memory_quant_bits: int = 32       # how the kernels store the keys and values (32, 8, 4)
    section: dict = field(default_factory=dict)   # the memory: section as read

    @property
    def tokens_per_chapter(self) -> int:
        return self.num_memory_tokens // self.num_chapters if self.use_chapters else self.num_memory_tokens


def _get(section: Mapping, key: str, default, kind):
    value = section.get(key, default)
    if value is None:
        return default
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"memory.{key} must be true or false, got {value!r}")
        return value
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"memory.{key} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)   # YAML reads 1e-6 as a string
            except (TypeError, ValueError):
                raise ConfigError(f"memory.{key} must be a number, got {value!r}") from None
        return float(value)
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"memory.{key} must be a string, got {value!r}")
    return value


def memory_layer_indices(section: Mapping, n_layer: int) -> list:
    """The trainer's placements: all, first_k, last_k, every_n, custom, none."""
    if _get(section, "vanilla_mode", False, bool) or not _get(section, "use_memory_adapter", True, bool):
        return []
    placement = _get(section, "memory_layer_placement", "all", str)
    k = _get(section, "memory_layer_k", 5, int)
    if placement == "none":
        return []
    if placement == "all":
        return list(range(n_layer))
    if placement == "first_k":
        return list(range(min(k, n_layer)))
    if placement == "last_k":
        return list(range(n_layer - min(k, n_layer), n_layer))
    if placement == "every_n":
        n = _get(section, "memory_layer_n", 3, int)
        if n <= 0:
            raise ConfigError(f"memory.memory_layer_n must be positive, got {n}")
        return list(range(0, n_layer, n))
    if placement == "custom":
        indices = section.get("memory_layer_indices")
        if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise ConfigError("memory.memory_layer_indices must be a list of layer numbers for 'custom' placement")
        bad = [i for i in indices if not 0 <= i < n_layer]
        if bad:
            raise ConfigError(f"memory.memory_layer_indices {bad} are outside the base model's {n_layer} layers")
        return sorted(set(indices))
    raise ConfigError(f"unknown memory.memory_layer_placement {placement!r} (all, first_k, last_k, every_n, custom, none)")


def memory_bank_assignments(section: Mapping, layers: list) -> dict:
    """layer -> bank: one shared bank, one per layer, or one per k memory layers."""
    sharing = _get(section, "memory_sharing", "shared", str)
    if sharing == "shared":
        return {layer: 0 for layer in layers}
    if sharing == "per_layer":
        return {layer: i for i, layer in enumerate(layers)}
    if sharing == "every_k_layers":
        k = _get(section, "memory_sharing_k", 2, int)
        if k <= 0:
            raise ConfigError(f"memory.memory_sharing_k must be positive, got {k}")
        return {layer: i // k for i, layer in enumerate(layers)}
    raise ConfigError(f"unknown memory.memory_sharing {sharing!r} (shared, per_layer, every_k_layers)")


def settings_from_section(section: Mapping, hp) -> MemorySettings:
    if not isinstance(section, Mapping):
        raise ConfigError("the config has no 'memory:' mapping")
    memory_dim = section.get("memory_dim")
    if memory_dim is not None and memory_dim != hp.n_embd:
        raise UnsupportedModelError(f"memory.memory_dim {memory_dim} differs from the model's hidden size {hp.n_embd}")
    if _get(section, "use_low_rank_memory", False, bool) and _get(section, "low_rank_mode", "factorized", str) != "factorized":
        raise UnsupportedModelError("memory.low_rank_mode 'reduced_dim' is not supported (factorized banks are)")
    strategy = _get(section, "routing_strategy_inference", "sequence", str)
    if strategy not in STRATEGIES:
        raise UnsupportedModelError(f"memory.routing_strategy_inference {strategy!r} is not one of {', '.join(STRATEGIES)}")
    n_heads = _get(section, "memory_num_heads", hp.n_head, int)
    n_kv_heads = _get(section, "memory_num_kv_heads", hp.n_head_kv, int)
    if n_heads <= 0 or n_kv_heads <= 0 or hp.n_embd % n_heads or n_heads % n_kv_heads:
        raise ConfigError(f"memory heads {n_heads} / {n_kv_heads} do not divide the hidden size {hp.n_embd}")
    layers = memory_layer_indices(section, hp.n_layer)
    n_tokens = _get(section, "num_memory_tokens", 1024, int)
    if n_tokens <= 0:
        raise ConfigError(f"memory.num_memory_tokens must be positive, got {n_tokens}")
    s = MemorySettings(
        num_memory_tokens=n_tokens, layers=layers, bank_of_layer=memory_bank_assignments(section, layers),
        n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=hp.n_embd // n_heads,
        use_chapters=_get(section, "use_chapters", False, bool),
        routed_scaling_factor=_get(section, "routed_scaling_factor", 1.0, float),
        normalize_shared_routed_before_mixing=_get(section, "normalize_shared_routed_before_mixing", False, bool),
        shared_routed_norm_type=_get(section, "shared_routed_norm_type", "rms", str),
        shared_routed_norm_eps=_get(section, "shared_routed_norm_eps", 1e-6, float),
        routing_strategy_inference=strategy,
        routing_window_size=_get(section, "routing_window_size", 128, int),
        memory_quant_bits=_get(section, "memory_quant_bits", 8, int) if _get(section, "quantize_memory", False, bool) else 32,
        section=dict(section))
    if s.memory_quant_bits not in QUANT_BITS:
        raise ConfigError(f"memory.memory_quant_bits must be 8 or 4, got {s.memory_quant_bits}")
    if s.shared_routed_norm_type not in ("rms", "layernorm"):
        raise ConfigError(f"memory.shared_routed_norm_type must be rms or layernorm, got {s.shared_routed_norm_type!r}")
    if s.use_chapters:
        s.num_chapters = _get(section, "num_chapters", 100, int)
        s.top_k_chapters = _get(section, "top_k_chapters", 20, int)
        s.num_shared_chapters = _get(section, "num_shared_chapters", 0, int)
        if s.num_chapters <= 0 or n_tokens % s.num_chapters:
            raise ConfigError(f"{n_tokens} memory tokens do not split into {s.num_chapters} chapters")
        if not 0 <= s.num_shared_chapters <= s.num_chapters:
            raise ConfigError(f"memory.num_shared_chapters must be in [0, {s.num_chapters}]")
        s.top_k_chapters = min(s.top_k_chapters, s.num_chapters - s.num_shared_chapters)
    return s


# ---- tensors

def _trainer_name(name: str) -> Optional[str]:
    """The trainer's parameter name inside a possibly prefixed one, or None for a base tensor."""
    for root in _ROOTS:
        at = name.find(root)
        if at == 0 or (at > 0 and name[at - 1] == "."):
            return name[at:]
    return None


def read_memory_tensors(path: Path) -> dict:
    """name -> float32 array (or the int8 / uint8 arrays of a quantized bank) of the memory tensors of
    a safetensors file; base model tensors are skipped unread."""
    f = native.open_safetensors(str(path))
    listing = f.tensors()
    out, ints = {}, []
    for name, (dtype, _shape) in listing.items():
        key = _trainer_name(name)
        if key is None:
            continue
        if "lora_" in name:
            raise UnsupportedModelError(f"'{name}': LoRA weights in a memory checkpoint are not read; merge them into the base "
                                        "(tokenmill.memory.merge_adapter_weights) or load them with load_adapter")
        if dtype in ("I8", "U8"):
            ints.append((name, key))
        else:
            out[key] = f.read(name)
    if ints:   # a quantized bank (quantize_memory_for_deployment): the safetensors package reads integers
        from safetensors import safe_open
        with safe_open(str(path), framework="numpy") as g:
            for name, key in ints:
                out[key] = g.get_tensor(name)
    return out


def _require(tensors: Mapping, name: str, shape: tuple) -> np.ndarray:
    if name not in tensors:
        raise ModelFormatError(f"the memory checkpoint has no tensor '{name}'")
    t = tensors[name]
    if tuple(t.shape) != tuple(shape):
        raise ModelFormatError(f"memory tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}")
    return t


def dequantize_bank(values: np.ndarray, scale: np.ndarray, bits: int, dim: int) -> np.ndarray:
    """The bank from quantize_memory_for_deployment's form: int8 values, or int4 + 8 two per byte
    (low nibble first), times a scale per row."""
    if bits == 8:
        q = values.astype(np.float32)
    else:
        lo, hi = (values & 0xF).astype(np.int16) - 8, (values >> 4).astype(np.int16) - 8
        q = np.stack([lo, hi], axis=-1).reshape(values.shape[0], -1)[:, :dim].astype(np.float32)
    return q * scale.reshape(-1, 1).astype(np.float32)


def bank_matrix(tensors: Mapping, bank: int, s: MemorySettings, dim: int) -> np.ndarray:
    """Memory bank `bank` as [N, d]: plain, factorized A B^T, or a deployed quantized one."""
    N = s.num_memory_tokens
    roots = [f"memory_banks.{bank}.base_bank.", f"memory_banks.{bank}."]
    for root in roots:
        if root + "quantized.values" in tensors:
            bits = int(s.section.get("memory_quant_bits", 8))
            scale = _require(tensors, root + "quantized.scale", (N,))
            return dequantize_bank(tensors[root + "quantized.values"], scale, bits, dim)
        if root + "memory" in tensors:
            return _require(tensors, root + "memory", (N, dim)).astype(np.float64)
        if root + "A" in tensors:
            a = tensors[root + "A"]
            if a.ndim != 2 or a.shape[0] != N:
                raise ModelFormatError(f"memory tensor '{root}A' has shape {list(a.shape)}, expected [{N}, rank]")
            b = _require(tensors, root + "B", (dim, a.shape[1]))
            return a.astype(np.float64) @ b.astype(np.float64).T
    raise ModelFormatError(f"the memory checkpoint has no bank {bank} (memory_banks.{bank}.[base_bank.]memory or .A / .B)")


def _normalized_rows(m: np.ndarray, kind: str, eps: float) -> np.ndarray:
    if kind == "rms":
        return m / np.sqrt((m * m).mean(axis=-1, keepdims=True) + eps)
    mu = m.mean(axis=-1, keepdims=True)
    return (m - mu) / np.sqrt(((m - mu) ** 2).mean(axis=-1, keepdims=True) + eps)


def _chain(tensors: Mapping, prefix: str, proj: str, n_in: int, n_out: int) -> list:
    """A projection as [W] (full rank) or [down, up] (low rank), as float32 [rows, cols] matrices."""
    full = f"{prefix}{proj}_proj.weight"
    if full in tensors:
        return [np.ascontiguousarray(_require(tensors, full, (n_out, n_in)), np.float32)]
    down_name, up_name = f"{prefix}{proj}_down.weight", f"{prefix}{proj}_up.weight"
    if down_name not in tensors:
        raise ModelFormatError(f"the memory checkpoint has neither '{full}' nor '{down_name}'")
    down = tensors[down_name]
    if down.ndim != 2 or down.shape[1] != n_in:
        raise ModelFormatError(f"memory tensor '{down_name}' has shape {list(down.shape)}, expected [rank, {n_in}]")
    up = _require(tensors, up_name, (n_out, down.shape[0]))
    return [np.ascontiguousarray(down, np.float32), np.ascontiguousarray(up, np.float32)]


def _apply_chain(x: np.ndarray, chain: list) -> np.ndarray:
    for m in chain:
        x = x @ m.astype(np.float64).T
    return x


class AttachedMemory:
    """A model's memory layers: the settings, the trainer's tensors, the routers' weights and the
    native extension that runs them in every forward pass."""

    def __init__(self, model, settings: MemorySettings, tensors: Mapping, source: str):
        hp = model.hparams
        s = settings
        self.settings, self.tensors, self.source = s, dict(tensors), source
        self.n_embd = hp.n_embd
        self.native = native.new_memory_layers(
            model.native, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, head_dim=s.head_dim, n_slots=s.num_memory_tokens,
            n_chapters=s.num_chapters if s.use_chapters else 0, n_shared=s.num_shared_chapters,
            top_k=s.top_k_chapters, routed_scale=s.routed_scaling_factor, norm_eps=1e-6,
            strategy=s.routing_strategy_inference, window=s.routing_window_size)
        E, QD, KD = hp.n_embd, s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        self.routers = {}   # layer -> (weight [C, E], bias [C])
        banks = {}
        for layer in s.layers:
            bank_id = s.bank_of_layer[layer]
            if bank_id not in banks:
                m = bank_matrix(tensors, bank_id, s, E)
                routed_selected = s.top_k_chapters > 0 and s.num_chapters > s.num_shared_chapters
                if s.normalize_shared_routed_before_mixing and s.num_shared_chapters > 0 and routed_selected:
                    m = _normalized_rows(m, s.shared_routed_norm_type, s.shared_routed_norm_eps)
                banks[bank_id] = m
            bank = banks[bank_id]
            prefix = f"memory_adapters.{layer}."
            attn = prefix + "memory_attn."
            norm = _require(tensors, prefix + "memory_layernorm.weight", (E,))
            q, o = _chain(tensors, attn, "q", E, QD), _chain(tensors, attn, "o", QD, E)
            k = np.ascontiguousarray(_apply_chain(bank, _chain(tensors, attn, "k", E, KD)), np.float32)
            v = np.ascontiguousarray(_apply_chain(bank, _chain(tensors, attn, "v", E, KD)), np.float32)
            router = bias = None
            if s.use_chapters:
                router = _require(tensors, f"routers.{layer}.router.weight", (s.num_chapters, E))
                bias_name = f"routers.{layer}.router.bias"
                bias = (_require(tensors, bias_name, (s.num_chapters,)) if bias_name in tensors
                        else np.zeros(s.num_chapters, np.float32))
                self.routers[layer] = (np.asarray(router, np.float32), np.asarray(bias, np.float32))
            self.native.add_layer(layer, norm, q, o, k, v, router, bias)
        if s.memory_quant_bits != 32:
            self.native.set_quant(QUANT_BITS[s.memory_quant_bits])
        self.quant = QUANT_BITS[s.memory_quant_bits]

    @property
    def layers(self) -> list:
        return list(self.settings.layers)

    @property
    def routed(self) -> bool:
        """Whether a router chooses chapters (routing state lives with each sequence)."""
        return self.settings.use_chapters

    @property
    def strategy(self) -> str:
        return self.native.strategy

    @property
    def top_k(self) -> int:
        return self.native.top_k

    @property
    def window_size(self) -> int:
        return self.native.window

    @property
    def table_bytes(self) -> int:
        """Bytes of the memory keys and values the kernels read (every memory layer)."""
        return self.native.table_bytes

    def set_routing(self, strategy: str, top_k: Optional[int] = None, window_size: Optional[int] = None) -> None:
        if strategy not in STRATEGIES:
            raise InvalidArgumentError(f"routing strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        self.native.set_routing(strategy, self.top_k if top_k is None else top_k,
                                self.window_size if window_size is None else window_size)

    def set_quant(self, quant: str) -> None:
        if quant not in QUANT_BITS.values():
            raise InvalidArgumentError(f"memory storage must be one of {', '.join(QUANT_BITS.values())}, got {quant!r}")
        self.native.set_quant(quant)
        self.quant = quant

    def last_route(self, cache, layer: int) -> list:
        """[(chapter, weight)] the newest position of `cache` was routed to at memory layer `layer`."""
        return self.native.last_route(cache.native, layer)

    def config_json(self) -> str:
        return json.dumps(self.settings.section, sort_keys=True, default=str)


def read_checkpoint(directory: PathLike, hp) -> tuple:
    """(settings, tensors) of a trainer checkpoint directory (config.yaml + model.safetensors)."""
    d = Path(directory)
    if not d.is_dir():
        raise ModelFileError(f"'{d}' is not a memory checkpoint directory (config.yaml + model.safetensors)")
    config_path = d / "config.yaml"
    weights = d / "model.safetensors"
    if not config_path.is_file():
        raise ModelFileError(f"'{d}' has no config.yaml")
    if not weights.is_file():
        hint = " (model.pt is a pickle and is never read)" if (d / "model.pt").exists() else ""
        raise ModelFileError(f"'{d}' has no model.safetensors{hint}")
    import yaml
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"'{config_path}' is not valid YAML: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("memory"), dict):
        raise ConfigError(f"'{config_path}' has no 'memory:' section")
    model_section = config.get("model") or {}
    n_layers = model_section.get("num_layers") if isinstance(model_section, dict) else None
    return settings_from_section(config["memory"], hp), read_memory_tensors(weights), n_layers


def attach_from_directory(model, directory: PathLike) -> AttachedMemory:
    settings, tensors, _ = read_checkpoint(directory, model.hparams)
    return AttachedMemory(model, settings, tensors, str(directory))


def gguf_has_memory(path: PathLike) -> bool:
    return GGUF_CONFIG_KEY in native.open_gguf(str(path)).metadata()


def attach_from_gguf(model, path: PathLike) -> Optional[AttachedMemory]:
    """The memory a GGUF written by tokenmill.memory.export_to_gguf carries, or None."""
    f = native.open_gguf(str(path))
    meta = f.metadata()
    if GGUF_CONFIG_KEY not in meta:
        return None
    try:
        section = json.loads(meta[GGUF_CONFIG_KEY])
    except (TypeError, ValueError):
        raise ModelFormatError(f"'{path}': {GGUF_CONFIG_KEY} is not JSON") from None
    settings = settings_from_section(section, model.hparams)
    tensors = {}
    for name, *_ in f.tensors():
        key = _trainer_name(name)
        if key is not None:
            tensors[key] = f.dequantize(name)
    return AttachedMemory(model, settings, tensors, str(path))


def is_memory_tensor(name: str) -> bool:
    return _trainer_name(name) is not None

