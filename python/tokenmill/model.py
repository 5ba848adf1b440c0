"""The friendly API: `load()` a model, then `tokenize`, `logits`, `generate` and `chat`.

Layers: `_core` (bindings) -> `Model` (owns the native model and tokenizer) -> generation helpers.
Generation is one internal token generator; `stream=True` exposes it as text pieces."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from . import _core, hf
from .chat import render_chat
from .default_model import resolve_default
from .errors import ContextOverflowError, InvalidArgumentError, ModelFormatError, TokenmillError
from .generation import GenerateConfig, Generator, generate_batch
from .kvcache import CacheSpec
from .tokenizer import Tokenizer, tokenizer_from_gguf_metadata, tokenizer_from_hf_dir

# Model.generate / chat / generate_batch follow llama.cpp's sampling defaults; GenerateConfig itself
# follows the seed's (temperature 1, no filters).
MODEL_SAMPLING_DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)

Prompt = Union[str, Sequence[int]]


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


# weight types a model can be converted to on load
WEIGHT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")


def load(
    path: Union[str, os.PathLike, None] = None,
    *,
    n_threads: Optional[int] = None,
    n_ctx: Optional[int] = None,
    tokenizer: Union[str, os.PathLike, None] = None,
    weights: Optional[str] = None,
    int8_prefill: bool = False,
) -> "Model":
    """Loads a GGUF file or a Hugging Face directory (config.json + safetensors + tokenizer.json).

    With no path, the default model (SmolLM2-135M-Instruct) is used, fetched on first use.
    `tokenizer` overrides the model's own: a tokenizer.json, an HF directory, or a GGUF file.
    `n_ctx` caps the context (default: the model's training context).
    `weights` converts every weight matrix on load to one of WEIGHT_TYPES (e.g. an f16 HF model to
    q8_0); the converted copy lives in memory, the file is only read. Matrices whose rows do not
    fit the type's 32-value blocks keep their type, as `tokenmill convert` does.
    `int8_prefill` trades precision for prompt speed the way llama.cpp does: forward passes of 8 or
    more tokens (prompts, batches of 8+ sequences) multiply q4_0 / q4_1 weights by activations rounded
    to int8 per 32-block (about twice the exact path's speed on AVX-512 VNNI CPUs; logits move by a few
    percent of their range, as llama.cpp's do). Single-sequence decode, other weight types and CPUs
    without VNNI keep the exact float path."""
    if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 1):
        raise InvalidArgumentError(f"n_threads must be a positive integer, got {n_threads!r}")
    if weights is not None and weights not in WEIGHT_TYPES:
        raise InvalidArgumentError(f"weights must be one of {', '.join(WEIGHT_TYPES)}, got {weights!r}")
    threads = n_threads or 0
    p = Path(path) if path is not None else resolve_default()
    if p.is_dir():
        hparams = hf.hparams_from_config(hf.read_config(p))
        native = _core.Model.from_safetensors(hf.safetensors_files(p), hparams, threads, weights or "",
                                                 bool(int8_prefill))
        tok = tokenizer_from_hf_dir(p)
    elif p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelFormatError(f"'{p}' is neither a GGUF file nor a Hugging Face model directory")
        native = _core.Model.from_gguf(str(p), threads, weights or "", bool(int8_prefill))
        tok = None
        if tokenizer is None:
            meta = _core.GGUFFile(str(p)).metadata()
            tok = tokenizer_from_gguf_metadata(meta) if "tokenizer.ggml.model" in meta else None
    else:
        raise FileNotFoundError(f"no model at '{p}'")
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    return Model(native, tok, str(p), n_ctx)


def load_tokenizer(path: Union[str, os.PathLike]) -> Tokenizer:
    """A tokenizer from a tokenizer.json, an HF directory holding one, or a GGUF file's vocabulary."""
    p = Path(path)
    if p.is_dir():
        tok = tokenizer_from_hf_dir(p)
    elif p.is_file() and p.name.endswith(".json"):
        tok = tokenizer_from_hf_dir(p.parent) if p.name == "tokenizer.json" else None
        if tok is None:
            from tokenizers import Tokenizer as HFTokenizer

            tok = Tokenizer(HFTokenizer.from_file(str(p)))
    elif p.is_file():
        tok = tokenizer_from_gguf_metadata(_core.GGUFFile(str(p)).metadata())
    else:
        raise FileNotFoundError(f"no tokenizer at '{p}'")
    if tok is None:
        raise ModelFormatError(f"no tokenizer.json in '{p}'")
    return tok


class Model:
    """A loaded model with its tokenizer. Thread-safe: forward passes are serialised natively."""

    def __init__(self, native: "_core.Model", tokenizer: Optional[Tokenizer], path: str, n_ctx: Optional[int] = None):
        self.native = native
        self.tokenizer = tokenizer
        self.path = path
        train_ctx = native.hparams.n_ctx_train
        if n_ctx is not None and (not isinstance(n_ctx, int) or n_ctx < 1):
            raise InvalidArgumentError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        self.n_ctx = min(n_ctx, train_ctx) if n_ctx else train_ctx

    def __repr__(self) -> str:
        hp = self.native.hparams
        return f"<tokenmill.Model {hp.arch} {self.native.n_params / 1e6:.0f}M params from '{self.path}'>"

    # ---- facts
    @property
    def hparams(self):
        return self.native.hparams

    @property
    def n_vocab(self) -> int:
        return self.native.hparams.n_vocab

    @property
    def eos_ids(self) -> list[int]:
        return list(self.tokenizer.eos_ids) if self.tokenizer else []

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise TokenmillError(f"model '{self.path}' has no tokenizer; pass tokenizer=... to load() or use token ids")
        return self.tokenizer

    # ---- text <-> ids
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidArgumentError(f"text must be a str, got {type(text).__name__}")
        return self._require_tokenizer().encode(text, add_special_tokens)

    def detokenize(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._require_tokenizer().decode(ids, skip_special_tokens)

    # ---- evaluation
    def new_cache(self, capacity: Optional[int] = None, spec: Optional[CacheSpec] = None) -> "_core.KVCache":
        """An empty KV cache for `capacity` tokens (default: the context), stored as `spec` says."""
        return _core.KVCache(self.native, capacity or self.n_ctx, (spec or CacheSpec()).native())

    def kv_bytes_per_token(self, kind: str = "fp32", v_kind: Optional[str] = None, fp16_prefix_layers: int = 0) -> int:
        """Bytes of K and V a cache of this kind stores per token, over all layers."""
        return self.native.kv_bytes_per_token(CacheSpec(kind, v_kind or kind, fp16_prefix_layers=fp16_prefix_layers).native())

    def supports_cache_kind(self, kind: str, v_kind: Optional[str] = None) -> bool:
        """Whether this model's head size suits the kind (block kinds need multiples of 32)."""
        try:
            self.kv_bytes_per_token(kind, v_kind)
        except InvalidArgumentError:
            return False
        return True

    def logits(
        self,
        ids: Sequence[int],
        cache_kind: str = "fp32",
        chunk: Optional[int] = None,
        *,
        cache_kind_v: Optional[str] = None,
        residual_len: int = 0,
        fp16_prefix_layers: int = 0,
    ) -> np.ndarray:
        """Logits for every position: float32 [len(ids), n_vocab], teacher-forced.

        The tokens go `chunk` at a time (default: all at once) through a KV cache of `cache_kind`
        (`cache_kind_v` for V if different): with chunk=1 every position reads quantized K and V,
        as decoding does, which is what cache-quality evaluations need."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise InvalidArgumentError("ids must be a non-empty 1-D sequence of token ids")
        if ids.size > self.n_ctx:
            raise ContextOverflowError(f"{ids.size} tokens exceed the context of {self.n_ctx}")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise InvalidArgumentError(f"chunk must be a positive integer, got {chunk!r}")
        spec = CacheSpec(cache_kind, cache_kind_v or cache_kind, residual_len, fp16_prefix_layers)
        cache = self.new_cache(int(ids.size), spec)
        ids32 = ids.astype(np.int32)
        step = chunk or ids.size
        parts = [self.native.eval(cache, ids32[i : i + step], "all", False)[0] for i in range(0, ids.size, step)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # ---- generation
    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        *,
        stream: bool = False,
        details: bool = False,
        **kwargs: Any,
    ):
        """Continues `prompt` (text or token ids) and returns the new text.

        Keywords are GenerateConfig fields (temperature, top_k, top_p, min_p, typical_p,
        repetition_penalty, presence_penalty, frequency_penalty, repeat_last_n, logit_bias, seed,
        stop, eos_token_id, ignore_eos, max_seq_len, context_overflow, logprobs); the sampling
        defaults here are llama.cpp's (temperature 0.8, top_k 40, top_p 0.95, min_p 0.05).
        stream=True returns an iterator of text pieces that never split a UTF-8 character;
        details=True returns a GenerationResult (text, token ids, finish reason, timings, logprobs)."""
        self._require_tokenizer()
        gen = Generator(self, _model_config(max_new_tokens, kwargs))
        run = gen.start(prompt)
        if stream:
            return (piece for _, piece in gen._drive(run) if piece)
        for _ in gen._drive(run):
            pass
        return gen.last if details else gen.last.text

    def chat(self, messages: Sequence[Mapping[str, Any]], max_new_tokens: int = 256, **kwargs: Any):
        """Answers a conversation [{'role': 'user', 'content': ...}, ...] with the model's template."""
        return self.generate(self.chat_prompt(messages), max_new_tokens, **kwargs)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        tok = self._require_tokenizer()
        text = render_chat(
            tok.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=tok.token_text(tok.bos_id) or "" if tok.bos_id is not None else "",
            eos_token=tok.token_text(tok.eos_ids[0]) or "" if tok.eos_ids else "",
        )
        return tok.encode(text, add_special_tokens=False)

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int = 256,
        *,
        details: bool = False,
        configs: Optional[Sequence[GenerateConfig]] = None,
        **kwargs: Any,
    ) -> list:
        """Generates for several prompts together (one forward pass per step). Each keyword may be
        a single value or a list with one value per prompt (e.g. seed=[1, 2, 3]); `configs` gives
        a full GenerateConfig per prompt instead. Returns the texts (or GenerationResults)."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise InvalidArgumentError("prompts must be a list of prompts")
        n = len(prompts)
        if configs is None:
            for k, v in kwargs.items():
                if _per_prompt(k, v) and len(v) != n:
                    raise InvalidArgumentError(f"{k} has {len(v)} values for {n} prompts")
            configs = [
                _model_config(max_new_tokens, {k: (v[i] if _per_prompt(k, v) else v) for k, v in kwargs.items()})
                for i in range(n)
            ]
        results = generate_batch(self, list(prompts), list(configs))
        return results if details else [r.text for r in results]


def _model_config(max_new_tokens: int, kwargs: dict) -> GenerateConfig:
    """A GenerateConfig with the Model-level sampling defaults under the caller's keywords."""
    return GenerateConfig(**{**MODEL_SAMPLING_DEFAULTS, "max_new_tokens": max_new_tokens, **kwargs})


_LIST_VALUED = {"stop", "eos_token_id"}   # fields whose single value may itself be a list


def _per_prompt(key: str, value) -> bool:
    """Whether a generate_batch keyword gives one value per prompt."""
    if not isinstance(value, list):
        return False
    if key in _LIST_VALUED:
        return bool(value) and all(isinstance(v, (list, tuple)) or v is None for v in value)
    return True
