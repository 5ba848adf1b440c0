"""Seed corpora for the fuzz targets: tiny random llama / gpt2 GGUF models (every weight type the
engine computes with, a tokenizer in the metadata), safetensors files of the HF layout and JSON
headers. Needs numpy and the gguf package; writes into the directory given as argv[1]."""

import json
import struct
import sys
from pathlib import Path

import gguf
import numpy as np

from tokenmill.engine import native

RNG = np.random.default_rng(0)
V, E, F, L, H, HKV, CTX = 64, 32, 64, 2, 2, 1, 64
HD = E // H


def matrix(rows, cols):
    return (RNG.standard_normal((rows, cols)) * 0.1).astype(np.float32)


def add(w, name, data, wtype):
    if data.ndim == 1 or wtype == "f32":
        w.add_tensor(name, data)
    elif wtype == "f16":
        w.add_tensor(name, data.astype(np.float16))
    else:
        raw = np.frombuffer(native.quantize(wtype, data.ravel()), dtype=np.uint8)
        w.add_tensor(name, raw.reshape(data.shape[0], -1), raw_dtype=getattr(gguf.GGMLQuantizationType, wtype.upper()))


def gguf_model(path, arch, wtype):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(CTX)
    w.add_embedding_length(E)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    if arch == "gpt2":
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_head_count_kv(HKV)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(V)])
    w.add_token_merges(["t 1"])
    add(w, "token_embd.weight", matrix(V, E), wtype)
    add(w, "output_norm.weight", np.ones(E, np.float32), wtype)
    if arch == "gpt2":
        add(w, "position_embd.weight", matrix(CTX, E), wtype)
        add(w, "output_norm.bias", np.zeros(E, np.float32), wtype)
    else:
        add(w, "output.weight", matrix(V, E), wtype)
    for l in range(L):
        p = f"blk.{l}."
        add(w, p + "attn_norm.weight", np.ones(E, np.float32), wtype)
        add(w, p + "ffn_norm.weight", np.ones(E, np.float32), wtype)
        if arch == "gpt2":
            add(w, p + "attn_norm.bias", np.zeros(E, np.float32), wtype)
            add(w, p + "ffn_norm.bias", np.zeros(E, np.float32), wtype)
            add(w, p + "attn_qkv.weight", matrix(3 * E, E), wtype)
            add(w, p + "attn_qkv.bias", np.zeros(3 * E, np.float32), wtype)
        else:
            add(w, p + "attn_q.weight", matrix(E, E), wtype)
            add(w, p + "attn_k.weight", matrix(HKV * HD, E), wtype)
            add(w, p + "attn_v.weight", matrix(HKV * HD, E), wtype)
            add(w, p + "ffn_gate.weight", matrix(F, E), wtype)
        add(w, p + "attn_output.weight", matrix(E, E), wtype)
        add(w, p + "ffn_up.weight", matrix(F, E), wtype)
        add(w, p + "ffn_down.weight", matrix(E, F), wtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def safetensors_file(path, tensors: dict):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dtype, arr) in tensors.items():
        raw = arr.tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    return head


def main(out: Path):
    for name in ("gguf", "model", "safetensors", "json"):
        (out / name).mkdir(parents=True, exist_ok=True)
    for arch in ("llama", "gpt2"):
        for wtype in ("f32", "f16", "q8_0", "q4_0", "q4_1"):
            for target in ("gguf", "model"):
                gguf_model(out / target / f"{arch}-{wtype}.gguf", arch, wtype)
    heads = [
        safetensors_file(out / "safetensors" / "f32.safetensors", {
            "model.embed_tokens.weight": ("F32", matrix(V, E)), "model.norm.weight": ("F32", np.ones(E, np.float32))}),
        safetensors_file(out / "safetensors" / "f16.safetensors", {
            "model.layers.0.mlp.up_proj.weight": ("F16", matrix(F, E).astype(np.float16)),
            "lm_head.weight": ("BF16", (matrix(V, E).view(np.uint32) >> 16).astype(np.uint16))}),
    ]
    for i, head in enumerate(heads):
        (out / "json" / f"header{i}.json").write_bytes(head)
    (out / "json" / "values.json").write_text('{"a": [1, -2.5e3, true, null, "\\u00e9\\n"], "b": {"c": {}}}')


if __name__ == "__main__":
    main(Path(sys.argv[1]))
