"""`tokenmill merge BASE ADAPTER OUT`: a LoRA adapter folded into its base model's weights,
W' = W + s * B A, written as an HF directory (safetensors) or a GGUF file.

The adapter is read exactly as at run time (engine.adapters), so merged and run-time outputs agree:
for a GGUF base the adapter's Q/K rows are already in the file's rotate-adjacent order; GPT-2's
Conv1D weights are stored [in, out] and get the transposed delta. The safetensors writer is our own
(a JSON header and raw bytes) because the `safetensors` package's numpy API has no bfloat16."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..engine import hf, native
from ..engine.adapters import read_adapter
from ..engine.model import WEIGHT_TYPES
from ..errors import InvalidArgumentError, ModelFormatError

PathLike = Union[str, Path]
HF_TYPES = ("f32", "f16", "bf16")
_ST_DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
_FROM_ST = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
_HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_GPT2_NAMES = {"o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}
_GGUF_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
               "down": "ffn_down"}


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.where(np.isnan(x), 0x7FC0, rounded).astype(np.uint16)


def encode(x: np.ndarray, wtype: str) -> bytes:
    if wtype == "f32":
        return np.ascontiguousarray(x, "<f4").tobytes()
    if wtype == "f16":
        return np.ascontiguousarray(x, "<f2").tobytes()
    return to_bf16_bits(x).astype("<u2").tobytes()


def write_safetensors(path: Path, tensors: dict, metadata: Optional[dict] = None) -> None:
    """tensors: name -> (type in HF_TYPES, float32 array)."""
    header, blobs, offset = {}, [], 0
    for name, (wtype, array) in tensors.items():
        blob = encode(array, wtype)
        header[name] = {"dtype": _ST_DTYPES[wtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    tmp.replace(path)


def _deltas(pairs: dict) -> dict:
    """(layer, projection) -> s * B A  [n_out, n_in] (float64 products, float32 result)."""
    return {key: (s * (b.astype(np.float64) @ a.astype(np.float64))).astype(np.float32) for key, (a, b, s) in pairs.items()}


def _hf_targets(hp, names: set) -> dict:
    """(layer, projection) -> (tensor name, output offset, stored transposed) in an HF checkpoint."""
    def find(suffix: str) -> str:
        hits = [n for n in names if n == suffix or n.endswith("." + suffix)]
        if len(hits) != 1:
            raise ModelFormatError(f"the base model has no single tensor named '*{suffix}'")
        return hits[0]

    out = {}
    qd, kd = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    for layer in range(hp.n_layer):
        if hp.arch == "gpt2":
            qkv = find(f"h.{layer}.attn.c_attn.weight")
            for proj, off in (("q", 0), ("k", qd), ("v", qd + kd)):
                out[(layer, proj)] = (qkv, off, True)
            for proj, mod in _GPT2_NAMES.items():
                out[(layer, proj)] = (find(f"h.{layer}.{mod}.weight"), 0, True)
        else:
            for proj, mod in _HF_NAMES.items():
                out[(layer, proj)] = (find(f"layers.{layer}.{mod}.weight"), 0, False)
    return out


def _apply(weights: dict, targets: dict, deltas: dict) -> None:
    for key, delta in deltas.items():
        name, off, transposed = targets[key]
        w = weights[name]
        view = w[:, off : off + delta.shape[0]] if transposed else w[off : off + delta.shape[0]]
        want = delta.T.shape if transposed else delta.shape
        if view.shape != want:
            raise ModelFormatError(f"{name}: the adapter's delta {delta.shape} does not fit the weight {w.shape}")
        view += delta.T if transposed else delta


def _merge_hf(base: Path, pairs: dict, hp, out: Path, wtype: Optional[str]) -> Path:
    files = hf.safetensors_files(base)
    opened = [native.open_safetensors(f) for f in files]
    types, weights = {}, {}
    for st in opened:
        for name, (dtype, _shape) in st.tensors().items():
            if dtype not in _FROM_ST:
                raise ModelFormatError(f"{name} has dtype {dtype}; merging reads F32, F16 and BF16")
            types[name], weights[name] = _FROM_ST[dtype], st.read(name)
    _apply(weights, _hf_targets(hp, set(weights)), _deltas(pairs))
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():   # config, tokenizer, generation config: everything but the weights
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    write_safetensors(out / "model.safetensors", {n: (wtype or types[n], w) for n, w in weights.items()},
                      {"format": "pt"})
    return out


def _merge_gguf(base: Path, pairs: dict, hp, out: Path, wtype: Optional[str]) -> Path:
    from .convert import rewrite_gguf

    deltas = _deltas(pairs)
    by_tensor = {}
    qd, kd = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    for (layer, proj), delta in deltas.items():
        if hp.arch == "gpt2" and proj in ("q", "k", "v"):
            off = {"q": 0, "k": qd, "v": qd + kd}[proj]
            by_tensor.setdefault(f"blk.{layer}.attn_qkv.weight", []).append((off, delta))
        else:
            by_tensor.setdefault(f"blk.{layer}.{_GGUF_NAMES[proj]}.weight", []).append((0, delta))
    names = {t[0] for t in native.open_gguf(str(base)).tensors()}
    missing = sorted(set(by_tensor) - names)
    if missing:
        raise ModelFormatError(f"{base} has no tensor {missing[0]} for the adapter")

    def add_delta(name: str, data: np.ndarray) -> None:
        for off, delta in by_tensor.get(name, ()):
            data[off : off + delta.shape[0]] += delta

    return rewrite_gguf(base, out, lambda type_name: wtype or (type_name if type_name in WEIGHT_TYPES else "f32"),
                        add_delta)


def merge_adapter(base: PathLike, adapter: PathLike, out: PathLike, type: Optional[str] = None) -> Path:
    """Writes `base` with `adapter` merged into it: to a GGUF file when `out` ends in .gguf (from a
    GGUF base, or an HF directory through export_to_gguf), else to an HF directory (from an HF
    base). `type`: the weights' type (HF: f32, f16, bf16; GGUF: also q8_0, q4_0, q4_1); None keeps
    each tensor's own."""
    from ..api import load

    base, out = Path(base), Path(out)
    to_gguf = out.suffix == ".gguf"
    allowed = WEIGHT_TYPES if to_gguf else HF_TYPES
    if type is not None and type not in allowed:
        raise InvalidArgumentError(f"type must be one of {', '.join(allowed)} for this output, got {type!r}")
    hp = load(base).hparams if not base.is_dir() else hf.hparams_from_config(hf.read_config(base))
    pairs, _info = read_adapter(adapter, hp)
    if base.is_dir() and to_gguf:
        from .export import export_to_gguf

        staged = out.with_name(out.stem + ".merged-hf")
        _merge_hf(base, pairs, hp, staged, "f32")
        try:
            return export_to_gguf(staged, out, type or "f32")
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    if base.is_dir():
        return _merge_hf(base, pairs, hp, out, type)
    if not to_gguf:
        raise InvalidArgumentError(f"a GGUF base merges into a .gguf file, not '{out}'")
    return _merge_gguf(base, pairs, hp, out, type)
