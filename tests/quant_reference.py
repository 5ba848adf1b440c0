"""Inputs for the quantizer identity test, and (run as a script) the recorder of llama.cpp's output for
them: `python tests/quant_reference.py` with llama-cpp-python installed calls ggml_quantize_chunk in its
libggml-base (the reference quantizers, no importance matrix -- what llama-quantize runs without one) and
writes the SHA-256 of each type's bytes to tests/data/llama_cpp_quants.json, so CI checks tokenmill's
quantizers against llama.cpp without building it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

TYPES = ("q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
RECORD = Path(__file__).parent / "data" / "llama_cpp_quants.json"


def random_rows() -> np.ndarray:
    """64 rows of 512 normal values, each row at its own scale (1e-3 .. 5)."""
    rs = np.random.RandomState(0)   # the legacy generator: its stream is frozen
    return (rs.standard_normal((64, 512)) * rs.uniform(0.001, 5, (64, 1))).astype(np.float32)


def edge_rows() -> np.ndarray:
    """Rows that take the quantizers' rare branches: zeros, constants, tiny and huge magnitudes,
    outliers, one-signed super-blocks, zero sub-blocks, values below fp16's range."""
    x = np.random.RandomState(1).standard_normal((16, 512)).astype(np.float32)
    x[0] = 0
    x[1] = 0.5
    x[2] = -0.25
    x[3] *= 1e-8
    x[4] *= 1e4
    x[5, 7] = 80.0
    x[6, :256] = np.abs(x[6, :256])
    x[7, :256] = -np.abs(x[7, :256])
    x[8, ::2] = 0
    x[9] = np.round(x[9] * 4) / 4
    x[10, :16] = 0
    x[10, 32:48] = 0
    x[11] = 1e-20
    x[12, 100] = -1e3
    return x


def smollm_rows(default_gguf) -> np.ndarray:
    """Real weights: SmolLM2's first FFN down projection [576, 1536], as tokenmill dequantizes it."""
    from tokenmill import _core

    return _core.GGUFFile(str(default_gguf)).dequantize("blk.0.ffn_down.weight").reshape(576, 1536)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _llama_cpp_quantize():
    import ctypes
    import os

    import llama_cpp

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    ggml_type = {"q5_0": 6, "q5_1": 7, "q4_k": 12, "q5_k": 13, "q6_k": 14}

    def quantize(wtype: str, x: np.ndarray) -> bytes:
        x = np.ascontiguousarray(x, np.float32)
        out = np.zeros(x.size * 2, np.uint8)   # more than any of these types needs
        lib.ggml_quantize_init(ggml_type[wtype])
        n = lib.ggml_quantize_chunk(ggml_type[wtype], x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        return out[:n].tobytes()

    return quantize, llama_cpp.__version__


if __name__ == "__main__":
    from tokenmill.engine.default_model import resolve_default

    quantize, version = _llama_cpp_quantize()
    inputs = {"random": random_rows(), "edge": edge_rows(), "smollm2_ffn_down_0": smollm_rows(resolve_default())}
    record = {"source": f"llama-cpp-python {version}: ggml_quantize_chunk without an importance matrix",
              "sha256": {name: {t: digest(quantize(t, x)) for t in TYPES} for name, x in inputs.items()}}
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {RECORD}")
