"""`tokenmill export HF_DIR OUT.gguf`: a Hugging Face model directory written as a complete GGUF
file in llama.cpp's layout (written with the `gguf` package): architecture keys, tensors under
llama.cpp's names (the llama architecture's Q/K rows permuted so RoPE rotates adjacent pairs, GPT-2's
Conv1D weights transposed), and the tokenizer (byte-level BPE vocabulary and merges, token types,
special tokens, chat template) when the directory has a tokenizer.json. Mistral is written as
llama.cpp writes it: architecture "llama" with its sliding window. `quantize_full_model` is the
seed's name for the same export (its method names mapped onto tokenmill's types)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..engine import hf, native
from ..engine.model import WEIGHT_TYPES, matrix_type
from ..errors import InvalidArgumentError, ModelFormatError, UnsupportedModelError
from ..jsonfile import read_json_object
from ..text.tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT

PathLike = Union[str, Path]
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
# the seed's quantize_full_model methods -> weight types
QUANTIZE_METHODS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "dynamic": "q8_0", "int8": "q8_0", "q8_0": "q8_0",
                    "q4_0": "q4_0", "q4_1": "q4_1", "q5_0": "q5_0", "q5_1": "q5_1", "q4_k": "q4_k", "q5_k": "q5_k",
                    "q6_k": "q6_k"}
# llama_ftype (the K-quants as their "_S" files: one type for every matrix that fits it)
_FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k": 14, "q5_k": 16,
              "q6_k": 18, "bf16": 32}
_LLAMA_MODULES = (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                  ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                  ("mlp.down_proj", "ffn_down"))
_GPT2_MODULES = (("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"), ("mlp.c_fc", "ffn_up"),
                 ("mlp.c_proj", "ffn_down"))


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-halves row order -> llama.cpp rotate-adjacent order, per head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_weights(directory: Path) -> dict:
    weights = {}
    for f in hf.safetensors_files(directory):
        st = native.open_safetensors(f)
        for name in st.tensors():
            weights[name.removeprefix("transformer.")] = st.read(name)
    return weights


def _llama_tensors(w: dict, hp, permute: bool) -> dict:
    """GGUF name -> float32 array."""
    def take(name):
        if name not in w:
            raise ModelFormatError(f"the model has no tensor '{name}'")
        return w[name]

    out = {"token_embd.weight": take("model.embed_tokens.weight"), "output_norm.weight": take("model.norm.weight")}
    if not hp.tied_embeddings and "lm_head.weight" in w:
        out["output.weight"] = w["lm_head.weight"]
    for i in range(hp.n_layer):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = take(p + "input_layernorm.weight")
        out[b + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
        for hf_name, gg in _LLAMA_MODULES:
            for part in ("weight", "bias"):
                t = w.get(p + f"{hf_name}.{part}")
                if t is None:
                    if part == "weight":
                        raise ModelFormatError(f"the model has no tensor '{p}{hf_name}.weight'")
                    continue
                heads = {"attn_q": hp.n_head, "attn_k": hp.n_head_kv}.get(gg, 0)
                out[f"{b}{gg}.{part}"] = _permute(t, heads) if permute and heads else t
    return out


def _gpt2_tensors(w: dict, hp) -> dict:
    out = {"token_embd.weight": w["wte.weight"], "position_embd.weight": w["wpe.weight"],
           "output_norm.weight": w["ln_f.weight"], "output_norm.bias": w["ln_f.bias"]}
    for i in range(hp.n_layer):
        p, b = f"h.{i}.", f"blk.{i}."
        for hf_name, gg in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            out[b + gg + ".weight"], out[b + gg + ".bias"] = w[p + hf_name + ".weight"], w[p + hf_name + ".bias"]
        for hf_name, gg in _GPT2_MODULES:
            out[b + gg + ".weight"] = np.ascontiguousarray(w[p + hf_name + ".weight"].T)   # Conv1D stores [in, out]
            out[b + gg + ".bias"] = w[p + hf_name + ".bias"]
    return out


def _add_hparams(writer, hp, wtype: str) -> None:
    writer.add_context_length(hp.n_ctx_train)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_file_type(_FILE_TYPE[wtype])
    if hp.arch == "gpt2":
        writer.add_layer_norm_eps(hp.norm_eps)
        return
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_layer_norm_rms_eps(hp.norm_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim != hp.n_embd // hp.n_head:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    writer.add_vocab_size(hp.n_vocab)
    if hp.sliding_window:
        writer.add_sliding_window(hp.sliding_window)


def _pre_tokenizer_name(pre: Optional[dict], path: Path) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for a tokenizer.json pre-tokenizer: the GPT-2 byte-level
    rule, digits isolated before it (SmolLM, StarCoder), or the Llama 3 / Qwen2 split regexes."""
    parts = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre or {}]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (parts[0].get("pattern") or {}).get("Regex")
        for name, rule in (("llama-bpe", LLAMA3_SPLIT), ("qwen2", QWEN2_SPLIT)):
            if regex == rule:
                return name
    raise UnsupportedModelError(f"{path}: its pre-tokenizer ({kinds}) has no llama.cpp name tokenmill knows")


def _add_tokenizer(writer, directory: Path, hp) -> None:
    """Byte-level BPE tokenizer.json (+ tokenizer_config.json) -> tokenizer.ggml.* keys."""
    path = directory / "tokenizer.json"
    if not path.exists():
        return
    tok = read_json_object(path)
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"{path}: only byte-level BPE tokenizers are exported (this one is {model.get('type')})")
    vocab = dict(model.get("vocab") or {})
    added = {t["content"]: t for t in tok.get("added_tokens") or []}
    for content, t in added.items():
        vocab.setdefault(content, t["id"])
    n = max(max(vocab.values()) + 1, hp.n_vocab)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n   # unused ids: "unused"
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = 1   # normal
    for content, t in added.items():
        types[t["id"]] = 3 if t.get("special") else 4   # control / user-defined
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tok.get("pre_tokenizer"), path))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    cfg_path = directory / "tokenizer_config.json"
    cfg = read_json_object(cfg_path) if cfg_path.exists() else {}

    def token_id(key):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return vocab.get(v) if isinstance(v, str) else None

    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        if token_id(key) is not None:
            add(token_id(key))
    if isinstance(cfg.get("add_bos_token"), bool):
        writer.add_add_bos_token(cfg["add_bos_token"])
    template = cfg.get("chat_template")
    if not isinstance(template, str) and (directory / "chat_template.jinja").exists():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        writer.add_chat_template(template)


def export_to_gguf(hf_dir: PathLike, out: PathLike, type: str = "f16") -> Path:
    """Writes the HF directory `hf_dir` as the GGUF file `out` with its weight matrices in `type`
    (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k; a K-quant's matrices whose rows
    are not whole super-blocks take q5_0 / q5_1 / q8_0, matrices whose rows do not fit 32-blocks stay
    f16, vectors f32). Returns the path."""
    import gguf

    from .convert import add_matrix, finish

    if type not in WEIGHT_TYPES:
        raise InvalidArgumentError(f"type must be one of {', '.join(WEIGHT_TYPES)}, got {type!r}")
    directory, out = Path(hf_dir), Path(out)
    if not directory.is_dir():
        raise InvalidArgumentError(f"'{directory}' is not a Hugging Face model directory")
    config = hf.read_config(directory)
    hp = hf.hparams_from_config(config)
    if hp.arch not in GGUF_ARCH:
        raise UnsupportedModelError(f"export to GGUF supports {', '.join(sorted(GGUF_ARCH))} models, not {hp.arch}")
    arch = GGUF_ARCH[hp.arch]
    w = _read_weights(directory)
    tensors = _gpt2_tensors(w, hp) if hp.arch == "gpt2" else _llama_tensors(w, hp, permute=arch == "llama")
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(config.get("_name_or_path") or directory.name)
    _add_hparams(writer, hp, type)
    _add_tokenizer(writer, directory, hp)
    for name, data in tensors.items():
        data = np.ascontiguousarray(data, np.float32)
        if data.ndim == 2:
            add_matrix(writer, name, data, matrix_type(type, data.shape[1]) or "f16")
        else:
            writer.add_tensor(name, data)
    finish(writer)
    tmp.replace(out)
    return out


def quantize_full_model(model_or_path, method: str, output_path: PathLike) -> Path:
    """The seed's name: writes the model (an HF directory, a GGUF file, or a loaded Model's file) as
    GGUF with its weights in the type `method` names (fp32, fp16, bf16; "dynamic" / "int8" = q8_0;
    q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k)."""
    from .convert import convert_gguf

    if method not in QUANTIZE_METHODS:
        raise InvalidArgumentError(f"method must be one of {', '.join(QUANTIZE_METHODS)}, got {method!r}")
    path = Path(getattr(model_or_path, "path", model_or_path))
    if path.is_dir():
        return export_to_gguf(path, output_path, QUANTIZE_METHODS[method])
    return convert_gguf(path, Path(output_path), QUANTIZE_METHODS[method])
