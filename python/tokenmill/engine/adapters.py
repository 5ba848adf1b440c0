"""LoRA adapters: PEFT directories (adapter_config.json + adapter_model.safetensors) and llama.cpp
GGUF LoRA files read into the core's `LoraAdapter` (out += s * B (A x) after each targeted
projection), and a model's registry of adapters and slots.

A request names an adapter ("name"), a mix ({"a": 1.0, "b": 0.5}) or none; every distinct mix gets
a slot of the model's native `LoraSet` and keeps it until an adapter in it is unloaded. Slots are
never reused, so anything keyed by a slot (a scheduler's prefix cache, a Generator's cache) can not
confuse one set of weights with another."""

from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np

from ..errors import InvalidArgumentError, ModelFileError, ModelFormatError, UnsupportedModelError
from ..jsonfile import read_json_object
from . import native

PathLike = Union[str, os.PathLike]
AdapterSpec = Union[None, str, Mapping[str, float]]

# PEFT module suffix -> the core's projections it feeds (a fused projection feeds several)
_HF_MODULES = {
    "self_attn.q_proj": ("q",), "self_attn.k_proj": ("k",), "self_attn.v_proj": ("v",), "self_attn.o_proj": ("o",),
    "mlp.gate_proj": ("gate",), "mlp.up_proj": ("up",), "mlp.down_proj": ("down",),
}
_GPT2_MODULES = {"attn.c_attn": ("q", "k", "v"), "attn.c_proj": ("o",), "mlp.c_fc": ("up",), "mlp.c_proj": ("down",)}
# llama.cpp tensor stem -> projections
_GGUF_MODULES = {
    "attn_q": ("q",), "attn_k": ("k",), "attn_v": ("v",), "attn_output": ("o",), "attn_qkv": ("q", "k", "v"),
    "ffn_gate": ("gate",), "ffn_up": ("up",), "ffn_down": ("down",),
}
# adapter_config.json fields whose non-default values change the math in ways tokenmill does not run
_UNSUPPORTED_FIELDS = {
    "use_dora": (False, None), "modules_to_save": (None, []), "bias": ("none",), "lora_bias": (False, None),
    "use_qalora": (False, None), "layer_replication": (None, []), "trainable_token_indices": (None, {}, []),
}
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.*?\.(?:layers|h)\.(?P<layer>\d+)\.(?P<sub>[\w.]+?))"
                       r"\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")
_GGUF_KEY = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<stem>\w+)\.weight\.lora_(?P<ab>[ab])$")


@dataclass
class AdapterInfo:
    """What an adapter is: its name, file, format ("peft" or "gguf"), rank(s), alpha, the projections
    it targets, its parameter count, the scale a bare name applies, and the bytes its pairs take as
    stored (fp16 where fp16 holds a pair's values exactly, as in adapters saved in f16; else f32)."""

    name: str
    path: str
    format: str
    ranks: tuple
    alpha: float
    targets: tuple
    n_params: int
    scale: float = 1.0
    stored_bytes: int = 0


def _modules_for(arch: str) -> dict:
    return _GPT2_MODULES if arch == "gpt2" else _HF_MODULES


def _split_rows(model_hp, projections: tuple) -> list[int]:
    qd, kd = model_hp.n_head * model_hp.head_dim, model_hp.n_head_kv * model_hp.head_dim
    sizes = {"q": qd, "k": kd, "v": kd}
    return [sizes[p] for p in projections]


def _permute_rows(b: np.ndarray, n_heads: int, to_gguf: bool) -> np.ndarray:
    """B's rows (outputs of Q or K) between HF's rotate-halves order and the GGUF llama converter's
    rotate-adjacent order, per head."""
    out, r = b.shape
    hd = out // n_heads
    if to_gguf:
        return b.reshape(n_heads, 2, hd // 2, r).swapaxes(1, 2).reshape(out, r)
    return b.reshape(n_heads, hd // 2, 2, r).swapaxes(1, 2).reshape(out, r)


class _Pairs:
    """(layer, projection) -> (A, B, scale), checked as they are collected."""

    def __init__(self, model_hp, source: str, adjacent_source: bool):
        self.hp, self.source, self.items = model_hp, source, {}
        # the model's Q/K rows are in GGUF llama order when it rotates adjacent pairs
        self.permute = adjacent_source != (model_hp.rope_style == native.RopeStyle.adjacent)
        self.ranks = set()

    def add(self, layer: int, projections: tuple, a: np.ndarray, b: np.ndarray, scale: float, what: str):
        if a.ndim != 2 or b.ndim != 2:
            raise ModelFormatError(f"{self.source}: {what} lora_A / lora_B must be matrices, got {a.shape} and {b.shape}")
        if b.shape[1] != a.shape[0]:
            raise ModelFormatError(f"{self.source}: {what} has rank {a.shape[0]} in lora_A but {b.shape[1]} in lora_B")
        if layer >= self.hp.n_layer:
            raise ModelFormatError(f"{self.source}: {what} targets layer {layer}; the model has {self.hp.n_layer}")
        parts = [b]
        if len(projections) > 1:
            sizes = _split_rows(self.hp, projections)
            if sum(sizes) != b.shape[0]:
                raise ModelFormatError(f"{self.source}: {what} has {b.shape[0]} output rows; the model's fused projection "
                                       f"has {sum(sizes)}")
            parts = np.split(b, np.cumsum(sizes)[:-1])
        for proj, part in zip(projections, parts):
            if self.permute and proj in ("q", "k"):
                heads = self.hp.n_head if proj == "q" else self.hp.n_head_kv
                part = _permute_rows(part, heads, to_gguf=self.hp.rope_style == native.RopeStyle.adjacent)
            key = (layer, proj)
            if key in self.items:
                raise ModelFormatError(f"{self.source}: layer {layer} {proj} is given twice")
            self.items[key] = (np.ascontiguousarray(a, np.float32), np.ascontiguousarray(part, np.float32), scale)
        self.ranks.add(int(a.shape[0]))


def _pattern_value(pattern: Mapping, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the end of the module's name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _read_peft(directory: Path, model_hp) -> tuple[_Pairs, float]:
    config = read_json_object(directory / "adapter_config.json")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise UnsupportedModelError(f"{directory}: peft_type '{kind}' is not supported (LORA is)")
    for field, defaults in _UNSUPPORTED_FIELDS.items():
        if config.get(field, defaults[0]) not in defaults:
            raise UnsupportedModelError(f"{directory}: adapter_config.json '{field}' = {config[field]!r} is not supported")
    r = config.get("r", 8)
    alpha = config.get("lora_alpha", 8)
    for name, value in (("r", r), ("lora_alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ModelFormatError(f"{directory}: adapter_config.json '{name}' must be a positive number, got {value!r}")
    rslora = bool(config.get("use_rslora", False))
    modules = _modules_for(model_hp.arch)
    known = {m.rsplit(".", 1)[1] for m in modules}
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(targets) - known)
        if unknown:
            raise UnsupportedModelError(f"{directory}: target module(s) {', '.join(unknown)} are not projections tokenmill "
                                        f"adapts in a {model_hp.arch} model ({', '.join(sorted(known))})")
    files = sorted(directory.glob("adapter_model*.safetensors"))
    if not files:
        pickles = list(directory.glob("adapter_model*.bin"))
        raise ModelFileError(f"{directory} has no adapter_model.safetensors" +
                             (" (only a pickle .bin, which tokenmill never loads)" if pickles else ""))
    halves: dict[tuple[str, str], np.ndarray] = {}
    for f in files:
        st = native.open_safetensors(str(f))
        for key in st.tensors():
            m = _PEFT_KEY.match(key)
            if not m or m["sub"] not in modules:
                raise UnsupportedModelError(f"{f.name}: tensor '{key}' is not a LoRA pair of a projection tokenmill adapts")
            halves[(m["module"], m["ab"])] = (int(m["layer"]), m["sub"], st.read(key))
    pairs = _Pairs(model_hp, str(directory), adjacent_source=False)
    for (module, ab), (layer, sub, _) in sorted(halves.items()):
        if ab != "A":
            if (module, "A") not in halves:
                raise ModelFormatError(f"{directory}: {module} has lora_B but no lora_A")
            continue
        if (module, "B") not in halves:
            raise ModelFormatError(f"{directory}: {module} has lora_A but no lora_B")
        a, b = halves[(module, "A")][2], halves[(module, "B")][2]
        rank = _pattern_value(config.get("rank_pattern"), module, r)
        if a.ndim == 2 and a.shape[0] != rank:
            raise ModelFormatError(f"{directory}: {module} has rank {a.shape[0]} but adapter_config.json says {rank}")
        mod_alpha = _pattern_value(config.get("alpha_pattern"), module, alpha)
        scale = mod_alpha / math.sqrt(rank) if rslora else mod_alpha / rank
        pairs.add(layer, modules[sub], a, b, float(scale), module)
    if not pairs.items:
        raise ModelFormatError(f"{directory}: the adapter holds no LoRA weights")
    return pairs, float(alpha)


def _text(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _read_gguf(path: Path, model_hp) -> tuple[_Pairs, float]:
    f = native.open_gguf(str(path))
    meta = f.metadata()
    if _text(meta.get("general.type", b"")) != "adapter" or _text(meta.get("adapter.type", b"")) != "lora":
        raise ModelFormatError(f"{path} is a GGUF file but not a LoRA adapter (general.type = adapter, adapter.type = lora)")
    arch = _text(meta.get("general.architecture", b""))
    if arch != model_hp.arch and not (arch == "llama" and model_hp.arch == "mistral"):
        raise InvalidArgumentError(f"{path} is an adapter for '{arch}' models; this model is '{model_hp.arch}'")
    alpha = float(meta.get("adapter.lora.alpha", 0.0))
    halves = {}
    for name, *_ in f.tensors():
        m = _GGUF_KEY.match(name)
        if not m or m["stem"] not in _GGUF_MODULES:
            raise UnsupportedModelError(f"{path.name}: tensor '{name}' is not a LoRA pair of a projection tokenmill adapts")
        halves[(int(m["layer"]), m["stem"], m["ab"])] = name
    pairs = _Pairs(model_hp, str(path), adjacent_source=arch == "llama")
    for (layer, stem, ab), name in sorted(halves.items()):
        if ab != "a":
            if (layer, stem, "a") not in halves:
                raise ModelFormatError(f"{path}: {name} has no lora_a")
            continue
        other = halves.get((layer, stem, "b"))
        if other is None:
            raise ModelFormatError(f"{path}: {name} has no lora_b")
        a, b = f.dequantize(name), f.dequantize(other)
        rank = a.shape[0] if a.ndim == 2 else 0
        scale = alpha / rank if alpha and rank else 1.0   # llama.cpp: alpha 0 means scale 1
        pairs.add(layer, _GGUF_MODULES[stem], a, b, float(scale), f"blk.{layer}.{stem}")
    if not pairs.items:
        raise ModelFormatError(f"{path}: the adapter holds no LoRA weights")
    return pairs, alpha


def read_adapter(path: PathLike, model_hp) -> tuple[dict, AdapterInfo]:
    """(layer, projection) -> (A, B, scale) and the adapter's facts, from a PEFT directory or a GGUF LoRA."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(f"an adapter is a path, got {type(path).__name__}")
    p = Path(path)
    if p.is_dir():
        if not (p / "adapter_config.json").exists():
            raise ModelFileError(f"{p} has no adapter_config.json; is it a PEFT adapter directory?")
        pairs, alpha, fmt = *_read_peft(p, model_hp), "peft"
    elif p.is_file():
        with open(p, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelFormatError(f"{p} is neither a PEFT adapter directory nor a GGUF LoRA file")
        pairs, alpha, fmt = *_read_gguf(p, model_hp), "gguf"
    else:
        raise FileNotFoundError(f"no adapter at '{p}'")
    n_params = sum(a.size + b.size for a, b, _ in pairs.items.values())
    targets = tuple(sorted({proj for _, proj in pairs.items}))
    return pairs.items, AdapterInfo(p.name, str(p), fmt, tuple(sorted(pairs.ranks)), alpha, targets, n_params)


def _rounded_to_f16(values: np.ndarray, key, what: str) -> np.ndarray:
    """values rounded to the nearest fp16 (kept as f32: the core then stores them in fp16, which holds
    them exactly); values beyond fp16's range are an error, not infinities."""
    with np.errstate(over="ignore"):
        rounded = values.astype(np.float16)
    if not np.isfinite(rounded).all():
        layer, proj = key
        raise InvalidArgumentError(f"LoRA layer {layer} {proj}: {what} has values beyond fp16's range; "
                                   "load it with dtype='auto'")
    return rounded.astype(np.float32)


class AdapterRegistry:
    """A model's loaded adapters and the slots of their mixes (thread-safe)."""

    def __init__(self, native_model):
        self._model = native_model
        self._set = None                     # the native LoraSet, joined to the model on first load
        self._adapters: dict[str, tuple] = {}   # name -> (native LoraAdapter, AdapterInfo)
        self._slots: dict[tuple, int] = {}      # canonical mix -> slot
        self._next_slot = 0
        self._lock = threading.RLock()

    def load(self, path: PathLike, name: Optional[str] = None, scale: float = 1.0, dtype: str = "auto") -> AdapterInfo:
        if dtype not in ("auto", "f16"):
            raise InvalidArgumentError(f"dtype must be 'auto' or 'f16', got {dtype!r}")
        pairs, info = read_adapter(path, self._model.hparams)
        if dtype == "f16":
            pairs = {key: (_rounded_to_f16(a, key, "A"), _rounded_to_f16(b, key, "B"), s)
                     for key, (a, b, s) in pairs.items()}
        info.name = info.name if name is None else name
        if not isinstance(info.name, str) or not info.name:
            raise InvalidArgumentError(f"an adapter's name must be a non-empty string, got {info.name!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise InvalidArgumentError(f"scale must be a finite number, got {scale!r}")
        info.scale = float(scale)
        adapter = native.new_lora_adapter(self._model)
        for (layer, proj), (a, b, s) in sorted(pairs.items()):
            adapter.add(layer, proj, a, b, s)
        adapter.seal()
        info.stored_bytes = adapter.bytes
        with self._lock:
            if info.name in self._adapters:
                raise InvalidArgumentError(f"an adapter named '{info.name}' is loaded already; unload it first")
            if self._set is None:
                self._set = native.new_lora_set()
                self._model.add_extension(self._set)
            self._adapters[info.name] = (adapter, info)
        return info

    def unload(self, name: str) -> None:
        """Drops the adapter and every slot whose mix uses it (their sequences run on the base model)."""
        with self._lock:
            if name not in self._adapters:
                raise InvalidArgumentError(f"no adapter named {name!r} is loaded")
            del self._adapters[name]
            for mix in [m for m in self._slots if any(n == name for n, _ in m)]:
                self._set.set_slot(self._slots.pop(mix), [])

    def infos(self) -> dict[str, AdapterInfo]:
        with self._lock:
            return {n: info for n, (_, info) in self._adapters.items()}

    def canonical(self, spec: AdapterSpec) -> tuple:
        """A request's adapter choice as sorted (name, scale) pairs; () is the base model."""
        if spec is None:
            return ()
        if isinstance(spec, str):
            spec = {spec: None}
        elif isinstance(spec, (tuple, list)):
            spec = dict(spec)
        if not isinstance(spec, Mapping):
            raise InvalidArgumentError(f"adapter must be a name, a {{name: scale}} mapping or None, got {type(spec).__name__}")
        with self._lock:
            out = []
            for name, scale in spec.items():
                if name not in self._adapters:
                    loaded = ", ".join(sorted(self._adapters)) or "none"
                    raise InvalidArgumentError(f"no adapter named {name!r} is loaded (loaded: {loaded})")
                scale = self._adapters[name][1].scale if scale is None else scale
                if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
                    raise InvalidArgumentError(f"the scale of adapter {name!r} must be a finite number, got {scale!r}")
                if scale != 0:
                    out.append((name, float(scale)))
        return tuple(sorted(out))

    def slot(self, spec: AdapterSpec) -> int:
        """The native slot of a request's adapter choice (-1: the base model), made on first use."""
        with self._lock:
            mix = self.canonical(spec)
            if not mix:
                return -1
            if mix not in self._slots:
                self._set.set_slot(self._next_slot, [(self._adapters[n][0], s) for n, s in mix])
                self._slots[mix] = self._next_slot
                self._next_slot += 1
            return self._slots[mix]
