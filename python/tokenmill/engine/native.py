"""The one module that imports the native core (`tokenmill._core`). The rest of the package reaches
the engine through what is defined here and the owning wrappers built on it (`engine.model`), so the
binding layer can change without the package noticing.

Every function here checks nothing itself: the bindings validate their arguments and raise
tokenmill exceptions (see `tokenmill.errors`)."""

from __future__ import annotations

from typing import Optional, Sequence

from .. import _core

RopeStyle = _core.RopeStyle
NativeModel = _core.Model
NativeCache = _core.KVCache
ForwardExtension = _core.ForwardExtension


# ---- machine
def default_thread_count() -> int:
    return _core.default_thread_count()


def available_cpus() -> int:
    return _core.available_cpus()


def devices() -> list[str]:
    """Devices this build has backends for ("cpu", and "cuda" / "hip" when built with them)."""
    return list(_core.devices())


def cpu_level() -> str:
    return _core.cpu_level()


def cpu_levels() -> list[str]:
    return list(_core.cpu_levels())


def set_cpu_level(name: str) -> None:
    """Forces a CPU kernel level; running forward passes finish on the old one."""
    _core.set_cpu_level(name)


# ---- files and formats
def open_gguf(path: str) -> "_core.GGUFFile":
    """A parsed GGUF file: .version, .alignment, .metadata(), .tensors(), .dequantize(name)."""
    return _core.GGUFFile(path)


def open_safetensors(path: str) -> "_core.SafetensorsFile":
    """A safetensors file: .metadata(), .tensors() (name -> (dtype, shape)), .read(name) as float32."""
    return _core.SafetensorsFile(path)


def new_lora_adapter(model: "_core.Model") -> "_core.LoraAdapter":
    return _core.LoraAdapter(model)


def new_lora_set() -> "_core.LoraSet":
    return _core.LoraSet()


def new_memory_layers(model: "_core.Model", **options) -> "_core.MemoryLayers":
    return _core.MemoryLayers(model, **options)


def quantize(type_name: str, x) -> bytes:
    return _core.quantize(type_name, x)


def dequantize(type_name: str, data: bytes, n: int):
    return _core.dequantize(type_name, data, n)


def hparams(**fields) -> "_core.HParams":
    hp = _core.HParams()
    for name, value in fields.items():
        setattr(hp, name, value)
    return hp


# ---- models, caches, samplers
def load_gguf(path: str, n_threads: int, weights: str, int8_prefill: bool, device: str,
              int8_decode: bool) -> "_core.Model":
    return _core.Model.from_gguf(path, n_threads, weights, int8_prefill, device, int8_decode)


def load_safetensors(files: Sequence[str], hp: "_core.HParams", n_threads: int, weights: str, int8_prefill: bool,
                     device: str, int8_decode: bool) -> "_core.Model":
    return _core.Model.from_safetensors(list(files), hp, n_threads, weights, int8_prefill, device, int8_decode)


def kv_config(k_kind: str, v_kind: str, residual_len: int, fp16_prefix_layers: int, local_window: int):
    return _core.KVCacheConfig(k_kind, v_kind, residual_len, fp16_prefix_layers, local_window)


def new_cache(model_or_pool, capacity: int, config, reserve: int) -> "_core.KVCache":
    """A cache of a model (contiguous, as config says) or of a KVPool (paged; config unused)."""
    if isinstance(model_or_pool, _core.KVPool):
        return _core.KVCache(model_or_pool, capacity)
    return _core.KVCache(model_or_pool, capacity, config, reserve)


def new_pool(model: "_core.Model", n_blocks: int, block_size: int, config) -> "_core.KVPool":
    return _core.KVPool(model, n_blocks, block_size, config)


def new_sampler(n_vocab: int, *, temperature: float, top_k: int, top_p: float, min_p: float, typical_p: float,
                repetition_penalty: float, presence_penalty: float, frequency_penalty: float, repeat_last_n: int,
                logit_bias: Sequence[tuple[int, float]], seed: int) -> "_core.Sampler":
    p = _core.SamplerParams()
    p.temperature = temperature
    p.top_k = top_k
    p.top_p = top_p
    p.min_p = min_p
    p.typical_p = typical_p
    p.repetition_penalty = repetition_penalty
    p.presence_penalty = presence_penalty
    p.frequency_penalty = frequency_penalty
    p.repeat_last_n = repeat_last_n
    p.logit_bias = list(logit_bias)
    p.seed = seed
    return _core.Sampler(p, n_vocab)


def forward(model: "_core.Model", caches: list, inputs: list, logit_rows, hidden_rows, layer_rows,
            adapters: Optional[Sequence[int]], decode_exact: bool, batch_invariant: bool = False, decode_rows: int = 0):
    return model.forward(caches, inputs, logit_rows, hidden_rows, layer_rows, adapters, decode_exact, batch_invariant,
                         decode_rows)
