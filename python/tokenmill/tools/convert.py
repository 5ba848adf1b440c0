"""`tokenmill convert`: rewrite a GGUF model with its 2-D weight matrices in another type (f32, f16,
bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k; a K-quant's matrices whose rows are not whole
super-blocks of 256 take q5_0 / q5_1 / q8_0 as llama-quantize does). Norms, biases and other vectors
stay f32; metadata is copied with its types. Quantization is the engine's own (byte-identical to the
GGUF reference quantizers: the gguf package's, and llama.cpp's for the K-quants); writing uses the
`gguf` package."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..engine import native
from ..engine.model import WEIGHT_TYPES as TARGETS
from ..engine.model import matrix_type
from ..errors import InvalidArgumentError


def _field_value(field, T):
    types = field.types
    if types[0] == T.ARRAY:
        if types[1] == T.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="surrogateescape") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == T.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="surrogateescape")
    return field.parts[field.data[0]].tolist()[0]


def add_matrix(writer, name: str, data: np.ndarray, wtype: str) -> None:
    """Adds a float32 matrix [rows, cols] to a gguf.GGUFWriter stored as wtype (one of TARGETS)."""
    import gguf

    if wtype == "f32":
        writer.add_tensor(name, data)
    elif wtype == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        raw = np.frombuffer(native.quantize(wtype, data.ravel()), dtype=np.uint8)
        writer.add_tensor(name, raw.reshape(data.shape[0], -1),
                          raw_dtype=getattr(gguf.GGMLQuantizationType, wtype.upper()))


def copy_metadata(src: Path, dst: Path, drop_prefix: Optional[str] = None):
    """A gguf.GGUFWriter for dst holding every metadata key of src with its type (tensors to add),
    less those starting with drop_prefix."""
    import gguf
    from gguf import GGUFValueType as T

    reader = gguf.GGUFReader(str(src))
    arch = _field_value(reader.fields["general.architecture"], T)
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment", "general.file_type"):
            continue
        if drop_prefix and key.startswith(drop_prefix):
            continue
        value = _field_value(field, T)
        if field.types[0] == T.ARRAY:
            writer.add_key_value(key, value, T.ARRAY, sub_type=field.types[1])
        else:
            writer.add_key_value(key, value, field.types[0])
    return writer


def finish(writer) -> None:
    """Writes a gguf.GGUFWriter's header, metadata and tensors, and closes it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def rewrite_gguf(src: Path, dst: Path, type_of: Callable[[str], str],
                 change: Optional[Callable[[str, np.ndarray], None]] = None,
                 skip: Optional[Callable[[str], bool]] = None, drop_keys: Optional[str] = None,
                 extra: Optional[Callable[[object], None]] = None) -> Path:
    """Writes `src` to `dst` tensor by tensor: each dequantized (and edited in place by `change(name,
    data)`), 2-D weights stored as `type_of(their type)` where their rows fit its blocks, the rest f32.
    skip(name): tensors left out; drop_keys: a prefix of metadata keys left out; extra(writer) adds
    keys and tensors of its own."""
    parsed = native.open_gguf(str(src))   # validates the file before anything is written
    writer = copy_metadata(src, dst, drop_keys)
    if extra is not None:
        extra(writer)
    for name, type_name, shape, _offset, _nbytes in parsed.tensors():
        if skip is not None and skip(name):
            continue
        data = parsed.dequantize(name)
        if change is not None:
            change(name, data)
        target = matrix_type(type_of(type_name), shape[0]) if len(shape) == 2 else None
        if target is not None:
            add_matrix(writer, name, data, target)
        else:
            writer.add_tensor(name, data.astype(np.float32))
    finish(writer)
    return dst


def convert_gguf(src: str | Path, dst: str | Path, wtype: str) -> Path:
    """Writes `src` to `dst` with every 2-D weight in `wtype`."""
    if wtype not in TARGETS:
        raise InvalidArgumentError(f"type must be one of {', '.join(TARGETS)}, got {wtype!r}")
    return rewrite_gguf(Path(src), Path(dst), lambda _type: wtype)
