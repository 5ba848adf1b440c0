"""The seed's deployment tools for memory-augmented models: merge_adapter_weights,
extract_memory_weights, quantize_memory_for_deployment, quantize_full_model, export_to_gguf.

Checkpoints written here use the trainer's layout (a directory of config.yaml + model.safetensors,
memory tensors only) and load back with tokenmill.load(base, memory=DIR). The GGUF holds the base
model under llama.cpp's names plus the memory tensors under the trainer's names and the memory
section as JSON (key tokenmill.memory.config): tokenmill loads it back with its memory; llama.cpp
refuses such a file (its loader counts the tensors it knows and fails on the extra ones), so give it
the base alone (tokenmill.export_to_gguf / quantize_full_model on the base)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import yaml

from ..engine.memory import GGUF_CONFIG_KEY, QUANT_BITS, bank_matrix, is_memory_tensor
from ..errors import InvalidArgumentError
from ..tools.export import QUANTIZE_METHODS, WEIGHT_TYPES
from ..tools.export import export_to_gguf as export_base
from ..tools.export import quantize_full_model as quantize_base
from ..tools.merge import merge_adapter

PathLike = Union[str, os.PathLike]


def _memory_of(model):
    memory = getattr(model, "memory", None)
    if memory is None:
        raise InvalidArgumentError("the model has no memory layers (tokenmill.load(base, memory=DIR))")
    return memory


def _bank_root(memory, bank: int) -> str:
    return f"memory_banks.{bank}." + ("base_bank." if memory.settings.use_chapters else "")


def _float_tensors(memory) -> dict:
    """The memory tensors as float32, a quantized bank expanded to a plain one."""
    out = {k: np.asarray(v, np.float32) for k, v in memory.tensors.items() if ".quantized." not in k}
    for bank in sorted(set(memory.settings.bank_of_layer.values())):
        root = _bank_root(memory, bank)
        if any(k.startswith(f"memory_banks.{bank}.") and ".quantized." in k for k in memory.tensors):
            out[root + "memory"] = bank_matrix(memory.tensors, bank, memory.settings, memory.n_embd).astype(np.float32)
    return out


def _write_checkpoint(directory: Path, tensors: dict, section: dict) -> Path:
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({"memory": section}, sort_keys=True)
    (directory / "config.yaml").write_text(text, encoding="utf-8")
    tmp = directory / "model.safetensors.tmp"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    tmp.replace(directory / "model.safetensors")
    return directory


def extract_memory_weights(model, output_path: Optional[PathLike] = None) -> dict:
    """The memory parts only (banks, routers, memory norms and attention) as {name: float32 array}
    under the trainer's names; with output_path, also written there as a checkpoint directory."""
    memory = _memory_of(model)
    tensors = _float_tensors(memory)
    if output_path is not None:
        section = dict(memory.settings.section)
        _write_checkpoint(Path(output_path), tensors, section)
    return tensors


def _quantize_rows(m: np.ndarray, bits: int):
    """Per-row absmax: int8 values (scale absmax/127) or int4 + 8 two per byte (absmax/7)."""
    qmax = 127.0 if bits == 8 else 7.0
    scale = np.abs(m).max(axis=1) / qmax
    q = np.clip(np.rint(m / np.where(scale > 0, scale, 1.0)[:, None]), -qmax, qmax).astype(np.int16)
    if bits == 8:
        return q.astype(np.int8), scale.astype(np.float32)
    q = q + 8
    if q.shape[1] % 2:
        q = np.pad(q, ((0, 0), (0, 1)), constant_values=8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8), scale.astype(np.float32)


def quantize_memory_for_deployment(model, bits: int = 8, output_path: Optional[PathLike] = None):
    """Stores the memory keys and values the kernels read as int8 or int4 with a scale per row (the
    model runs that way from now on; model.memory.table_bytes shows the saving). With output_path, a
    checkpoint directory whose banks are stored the same way (materialised A B^T, int8 / int4 rows),
    which loads back quantized. Returns the model."""
    memory = _memory_of(model)
    if bits not in (8, 4):
        raise InvalidArgumentError(f"bits must be 8 or 4, got {bits!r}")
    memory.set_quant(QUANT_BITS[bits])
    memory.settings.memory_quant_bits = bits
    if output_path is not None:
        tensors = _float_tensors(memory)
        for bank in sorted(set(memory.settings.bank_of_layer.values())):
            root = _bank_root(memory, bank)
            m = bank_matrix(tensors, bank, memory.settings, model.n_embd)
            for k in [k for k in tensors if k.startswith(root)]:
                del tensors[k]
            tensors[root + "quantized.values"], tensors[root + "quantized.scale"] = _quantize_rows(m, bits)
        section = {**memory.settings.section, "quantize_memory": True, "memory_quant_bits": bits}
        _write_checkpoint(Path(output_path), tensors, section)
    return model


def merge_adapter_weights(model, output_path: PathLike, adapter: Optional[str] = None, type: Optional[str] = None) -> Path:
    """W' = W + s B A of one of the model's loaded LoRA adapters into its base weights, written to
    output_path (GGUF or an HF directory, as tokenmill.merge_adapter writes); the adapter's own
    tensors are not carried over, so nothing is applied twice on reload. A model's memory layers
    are not part of the base: export_to_gguf writes both."""
    infos = model.adapters
    if adapter is None:
        if len(infos) != 1:
            raise InvalidArgumentError(f"the model has {len(infos)} adapters loaded; name the one to merge")
        adapter = next(iter(infos))
    if adapter not in infos:
        raise InvalidArgumentError(f"no adapter named {adapter!r} (loaded: {', '.join(infos) or 'none'})")
    return merge_adapter(model.path, infos[adapter].path, output_path, type)


def export_to_gguf(model, output_path: PathLike, quantization_type: str = "f16") -> Path:
    """A GGUF of the base model with its weights in quantization_type (one of WEIGHT_TYPES: f32, f16,
    bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k) and the memory layers in f32 beside them (see
    the module docstring); loads back with tokenmill.load(output_path), memory included."""
    from ..tools.convert import rewrite_gguf

    if quantization_type not in WEIGHT_TYPES:
        raise InvalidArgumentError(f"quantization_type must be one of {', '.join(WEIGHT_TYPES)}, got {quantization_type!r}")
    memory = _memory_of(model)
    out, base = Path(output_path), Path(model.path)
    staged = None
    if base.is_dir():   # an HF base goes through the GGUF exporter first
        staged = out.with_name(out.name + ".base.tmp")
        export_base(base, staged, "f32")
        base = staged
    tensors = _float_tensors(memory)
    section = {**memory.settings.section}
    if memory.settings.memory_quant_bits != 32:
        section.update(quantize_memory=True, memory_quant_bits=memory.settings.memory_quant_bits)

    def add_memory(writer) -> None:
        writer.add_string(GGUF_CONFIG_KEY, json.dumps(section, sort_keys=True, default=str))
        for name, data in tensors.items():
            writer.add_tensor(name, np.ascontiguousarray(data, np.float32))

    tmp = out.with_name(out.name + ".tmp")
    try:
        rewrite_gguf(base, tmp, lambda _t: quantization_type, skip=is_memory_tensor, drop_keys="tokenmill.memory.",
                     extra=add_memory)
        tmp.replace(out)
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return out


def quantize_full_model(model_or_path, method: str, output_path: PathLike) -> Path:
    """The seed's name: the whole model as GGUF with its weights in the type `method` names (fp32,
    fp16, bf16; "dynamic" / "int8" = q8_0; q4_0, q4_1), the memory layers included when it has them."""
    if getattr(model_or_path, "memory", None) is None:
        return quantize_base(model_or_path, method, output_path)
    if method not in QUANTIZE_METHODS:
        raise InvalidArgumentError(f"method must be one of {', '.join(QUANTIZE_METHODS)}, got {method!r}")
    return export_to_gguf(model_or_path, output_path, QUANTIZE_METHODS[method])
