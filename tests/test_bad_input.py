"""Hostile, truncated and corrupt model files, unknown architectures and bad arguments: each gives
a typed tokenmill exception with a clear message, never a crash or a hang."""

import json
import struct

import gguf
import numpy as np
import pytest

import tokenmill
from tokenmill import _core
from gguf_util import write_tiny_gguf


@pytest.fixture(scope="module")
def good_gguf(tiny_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "tiny.gguf"
    write_tiny_gguf(tiny_models["llama"][1], "llama", path, "q8_0")
    return path.read_bytes()


def _write(tmp_path, data: bytes, name="bad.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _gstr(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def test_wrong_magic(tmp_path):
    with pytest.raises(tokenmill.ModelFormatError, match="not a GGUF file"):
        _core.GGUFFile(str(_write(tmp_path, b"GGML" + bytes(100))))
    with pytest.raises(tokenmill.ModelFormatError, match="neither a GGUF file"):
        tokenmill.load(_write(tmp_path, b"PK\x03\x04" + bytes(100), "model.bin"))


@pytest.mark.parametrize("version,match", [(1, "v1 is not supported"), (7, "version 7"), (0x03000000, "big-endian")])
def test_unsupported_versions(tmp_path, version, match):
    with pytest.raises(tokenmill.UnsupportedModelError, match=match):
        _core.GGUFFile(str(_write(tmp_path, _header(0, 0, version))))


def test_every_truncation_fails_cleanly(tmp_path, good_gguf):
    cuts = list(range(0, 4096, 37)) + [len(good_gguf) // 2, len(good_gguf) - 1]
    for cut in cuts:
        p = _write(tmp_path, good_gguf[:cut])
        with pytest.raises(tokenmill.TokenmillError):
            _core.Model.from_gguf(str(p), 1)


PAD = bytes(96)   # enough bytes that the minimum-size checks pass and the targeted check fires


@pytest.mark.parametrize(
    "blob,match",
    [
        (_header(2**62, 0), "tensor count"),
        (_header(0, 2**60), "metadata count"),
        (_header(0, 1) + struct.pack("<Q", 2**63) + b"k" + PAD, "truncated"),
        (_header(0, 1) + _gstr(b"k") + struct.pack("<I", 99) + PAD, "unknown metadata value type"),
        (_header(0, 1) + _gstr(b"k") + struct.pack("<IIQ", 9, 4, 2**61) + PAD, "array count"),
        (_header(0, 1) + _gstr(b"k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 6 + PAD, "nested too deeply"),
        (_header(0, 1) + _gstr(b"k") + struct.pack("<I", 7) + b"\x05" + PAD, "bool value"),
        (_header(1, 0) + _gstr(b"t") + struct.pack("<I", 1000) + PAD, "dimensions"),
        (_header(1, 0) + _gstr(b"t") + struct.pack("<IQQ", 2, 2**40, 2**40) + PAD, "invalid shape"),
        (_header(1, 0) + _gstr(b"t") + struct.pack("<IQIQ", 1, 32, 8, 2**60) + PAD, "outside the file"),
        (_header(1, 0) + _gstr(b"t") + struct.pack("<IQIQ", 1, 32, 8, 1 << 20) + PAD, "outside the file"),
        (_header(1, 0) + _gstr(b"t") + struct.pack("<IQIQ", 1, 32, 8, 3) + PAD, "not aligned"),
        (_header(1, 0) + _gstr(b"t") + struct.pack("<IQIQ", 1, 33, 8, 0) + PAD, "block size"),
        (_header(0, 2) + _gstr(b"k") + struct.pack("<IB", 0, 1) + _gstr(b"k") + struct.pack("<IB", 0, 2) + PAD,
         "duplicate"),
        (_header(0, 1) + _gstr(b"general.alignment") + struct.pack("<II", 4, 3) + PAD, "power of two"),
    ],
)
def test_hostile_headers(tmp_path, blob, match):
    with pytest.raises(tokenmill.ModelFormatError, match=match):
        _core.GGUFFile(str(_write(tmp_path, blob)))


@pytest.mark.parametrize("type_id", [77, 1 << 16])   # 1 << 16: tokenmill's own nf4 (KV cache only)
def test_unknown_tensor_type(tmp_path, type_id):
    blob = _header(1, 0) + _gstr(b"t") + struct.pack("<IQIQ", 1, 32, type_id, 0) + bytes(64)
    with pytest.raises(tokenmill.UnsupportedModelError, match=f"unknown type id {type_id}"):
        _core.GGUFFile(str(_write(tmp_path, blob)))


def test_random_corruption_never_crashes(tmp_path, good_gguf):
    """Flip bytes in the header region: every result is a model or a tokenmill exception."""
    rng = np.random.default_rng(0)
    header_end = 2048
    for trial in range(150):
        data = bytearray(good_gguf)
        for pos in rng.integers(0, header_end, size=rng.integers(1, 6)):
            data[pos] = int(rng.integers(0, 256))
        p = _write(tmp_path, bytes(data))
        try:
            _core.Model.from_gguf(str(p), 1)
        except tokenmill.TokenmillError:
            pass


def test_unknown_architecture_is_named(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(tokenmill.UnsupportedModelError, match="'mamba' is not supported"):
        tokenmill.load(path)
    hf_dir = tmp_path / "t5"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(tokenmill.UnsupportedModelError, match="'t5' is not supported"):
        tokenmill.load(hf_dir)


def test_missing_tensor_and_wrong_shape(tmp_path, tiny_models):
    src = tiny_models["llama"][0]
    import shutil
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(src, d)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(tokenmill.ModelFormatError, match="lacks tensor 'blk.1.ffn_up.weight'"):
        tokenmill.load(d)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((7, 64), np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(tokenmill.ModelFormatError, match=r"shape \[7, 64\], expected \[160, 64\]"):
        tokenmill.load(d)


# ---- safetensors

def _dir_with_config(tmp_path, src):
    """A model directory holding src's config.json and nothing else yet."""
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    return d


def _safetensors(header: dict, data: bytes = b"", header_len=None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


@pytest.mark.parametrize(
    "blob,match",
    [
        (b"\x01\x02", "too short"),
        (_safetensors({}, header_len=2**40), "header length"),
        (struct.pack("<Q", 5) + b'{"a":', "invalid JSON"),
        (struct.pack("<Q", 4) + b"[1] ", "not a JSON object"),
        (_safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)), "outside"),
        (_safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(16)), "does not match"),
        (_safetensors({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 8]}}, bytes(16)), "invalid shape"),
        (_safetensors({"w": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)), "unknown dtype"),
        (_safetensors({"w": {"dtype": "F32", "shape": [4]}}, bytes(16)), "lacks"),
        (_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 4]}}, bytes(16)), "invalid data_offsets"),
        (struct.pack("<Q", 2000) + b"[" * 1000 + b"]" * 1000, "too deep|not a JSON object"),
    ],
)
def test_hostile_safetensors(tmp_path, tiny_models, blob, match):
    d = _dir_with_config(tmp_path, tiny_models["llama"][0])
    (d / "model.safetensors").write_bytes(blob)
    with pytest.raises(tokenmill.ModelFormatError, match=match):
        tokenmill.load(d)


def test_truncated_safetensors(tmp_path, tiny_models):
    src = tiny_models["qwen2"][0]
    d = _dir_with_config(tmp_path, src)
    data = (src / "model.safetensors").read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        (d / "model.safetensors").write_bytes(data[:cut])
        with pytest.raises(tokenmill.ModelFormatError):
            tokenmill.load(d)


def test_pickle_weights_are_refused(tmp_path, tiny_models):
    d = _dir_with_config(tmp_path, tiny_models["llama"][0])
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(tokenmill.UnsupportedModelError, match="never loads"):
        tokenmill.load(d)


def test_bad_config_values(tmp_path, tiny_models):
    src = tiny_models["llama"][0]
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_attention_heads"] = "four"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(tokenmill.ModelFormatError, match="num_attention_heads"):
        tokenmill.load(d)
    cfg["num_attention_heads"] = 3   # does not divide the 2 KV heads' groups
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(tokenmill.ModelFormatError, match="head"):
        tokenmill.load(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(tokenmill.ModelFormatError, match="config.json"):
        tokenmill.load(d)
