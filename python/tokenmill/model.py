"""The friendly API: `load()` a model, then `tokenize`, `logits`, `generate` and `chat`.

Layers: `_core` (bindings) -> `Model` (owns the native model and tokenizer) -> generation helpers.
Generation is one internal token generator; `stream=True` exposes it as text pieces."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from . import _core, hf
from .chat import render_chat
from .default_model import resolve_default
from .errors import ContextOverflowError, InvalidArgumentError, ModelFormatError, TokenmillError
from .tokenizer import StreamDecoder, Tokenizer, tokenizer_from_gguf_metadata, tokenizer_from_hf_dir

Prompt = Union[str, Sequence[int]]


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def load(
    path: Union[str, os.PathLike, None] = None,
    *,
    n_threads: Optional[int] = None,
    n_ctx: Optional[int] = None,
    tokenizer: Union[str, os.PathLike, None] = None,
) -> "Model":
    """Loads a GGUF file or a Hugging Face directory (config.json + safetensors + tokenizer.json).

    With no path, the default model (SmolLM2-135M-Instruct) is used, fetched on first use.
    `tokenizer` overrides the model's own: a tokenizer.json, an HF directory, or a GGUF file.
    `n_ctx` caps the context (default: the model's training context)."""
    if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 1):
        raise InvalidArgumentError(f"n_threads must be a positive integer, got {n_threads!r}")
    threads = n_threads or 0
    p = Path(path) if path is not None else resolve_default()
    if p.is_dir():
        hparams = hf.hparams_from_config(hf.read_config(p))
        native = _core.Model.from_safetensors(hf.safetensors_files(p), hparams, threads)
        tok = tokenizer_from_hf_dir(p)
    elif p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelFormatError(f"'{p}' is neither a GGUF file nor a Hugging Face model directory")
        native = _core.Model.from_gguf(str(p), threads)
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


def sampler_params(
    *,
    temperature: float = 0.8,
    top_k: int = 40,
    top_p: float = 0.95,
    min_p: float = 0.05,
    typical_p: float = 1.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repeat_last_n: int = 64,
    logit_bias: Optional[Mapping[int, float]] = None,
    seed: Optional[int] = None,
) -> "_core.SamplerParams":
    """Checks and packs sampling settings (ValueError naming the parameter when out of range)."""

    def number(name, value, lo=None, hi=None, lo_open=False):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise InvalidArgumentError(f"{name} must be a number, got {value!r}")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise InvalidArgumentError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
        if hi is not None and value > hi:
            raise InvalidArgumentError(f"{name} must be <= {hi}, got {value}")
        return value

    def integer(name, value, lo):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise InvalidArgumentError(f"{name} must be an integer >= {lo}, got {value!r}")
        return int(value)

    p = _core.SamplerParams()
    p.temperature = number("temperature", temperature, 0.0)
    p.top_k = integer("top_k", top_k, 0)
    p.top_p = number("top_p", top_p, 0.0, 1.0, lo_open=True)
    p.min_p = number("min_p", min_p, 0.0, 1.0)
    p.typical_p = number("typical_p", typical_p, 0.0, 1.0, lo_open=True)
    p.repetition_penalty = number("repetition_penalty", repetition_penalty, 0.0, lo_open=True)
    p.presence_penalty = number("presence_penalty", presence_penalty)
    p.frequency_penalty = number("frequency_penalty", frequency_penalty)
    p.repeat_last_n = integer("repeat_last_n", repeat_last_n, -1)
    p.logit_bias = [(int(k), float(v)) for k, v in (logit_bias or {}).items()]
    if seed is None:
        seed = secrets.randbits(64)
    p.seed = integer("seed", seed, 0) & (2**64 - 1)
    return p


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

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise InvalidArgumentError("the prompt is empty")
        if len(ids) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(ids)} tokens but the context holds {self.n_ctx} (including at least one new token)"
            )
        return ids

    # ---- evaluation
    def new_cache(self, capacity: Optional[int] = None) -> "_core.KVCache":
        return _core.KVCache(self.native, capacity or self.n_ctx)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits for every position: float32 [len(ids), n_vocab]."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise InvalidArgumentError("ids must be a non-empty 1-D sequence of token ids")
        if ids.size > self.n_ctx:
            raise ContextOverflowError(f"{ids.size} tokens exceed the context of {self.n_ctx}")
        cache = self.new_cache(int(ids.size))
        out, _ = self.native.eval(cache, ids.astype(np.int32), "all", False)
        return out

    # ---- generation
    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        *,
        stop: Union[str, Sequence[str], None] = None,
        eos_ids: Optional[Sequence[int]] = None,
        stream: bool = False,
        **sampling: Any,
    ) -> Union[str, Iterator[str]]:
        """Continues `prompt` (text or token ids). Sampling keywords: temperature (0 = greedy),
        top_k, top_p, min_p, typical_p, repetition_penalty, presence_penalty, frequency_penalty,
        repeat_last_n, logit_bias, seed. `stop` strings end the text and are not included;
        `eos_ids` overrides the model's end-of-sequence ids. With stream=True, returns an iterator
        of text pieces (never splitting a UTF-8 character)."""
        pieces = self._text_pieces(prompt, max_new_tokens, stop, eos_ids, sampling)
        return pieces if stream else "".join(pieces)

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

    def _check_new_tokens(self, max_new_tokens) -> int:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise InvalidArgumentError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        return int(max_new_tokens)

    def _tokens(self, prompt_ids: list[int], max_new_tokens: int, params, eos: set) -> Iterator[int]:
        """The one generation loop: prefill, then sample / decode until EOS, the token limit or
        the end of the context."""
        budget = min(max_new_tokens, self.n_ctx - len(prompt_ids))
        if budget <= 0:
            return
        cache = self.new_cache(len(prompt_ids) + budget)
        sampler = _core.Sampler(params, self.n_vocab)
        history = np.asarray(prompt_ids, dtype=np.int32)
        logits, _ = self.native.eval(cache, history, "last", False)
        for _ in range(budget):
            token = sampler.sample(logits[0], history)
            if token in eos:
                return
            yield token
            history = np.append(history, np.int32(token))
            if cache.n_past == cache.capacity:
                return
            logits, _ = self.native.eval(cache, history[-1:], "last", False)

    def _text_pieces(self, prompt, max_new_tokens, stop, eos_ids, sampling) -> Iterator[str]:
        max_new_tokens = self._check_new_tokens(max_new_tokens)
        stops = _check_stop(stop)
        params = sampler_params(**sampling)
        prompt_ids = self._prompt_ids(prompt)
        eos = set(self.eos_ids if eos_ids is None else [int(e) for e in eos_ids if int(e) >= 0])
        return _stop_at_strings(self._decoded(self._tokens(prompt_ids, max_new_tokens, params, eos)), stops)

    def _decoded(self, tokens: Iterator[int]) -> Iterator[str]:
        decoder = StreamDecoder(self._require_tokenizer())
        for token in tokens:
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail


def _check_stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise InvalidArgumentError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stops):
        raise InvalidArgumentError("stop strings must not be empty")
    return list(stops)


def _stop_at_strings(pieces: Iterator[str], stops: list[str]) -> Iterator[str]:
    """Passes text through until a stop string appears (matched across piece boundaries); the stop
    string and everything after it are dropped. Text that could begin a stop string is held back
    until it is known not to."""
    if not stops:
        yield from pieces
        return
    pending = ""
    for piece in pieces:
        pending += piece
        hits = [i for i in (pending.find(s) for s in stops) if i >= 0]
        if hits:
            if min(hits) > 0:
                yield pending[: min(hits)]
            return
        hold = max((k for s in stops for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
        if len(pending) > hold:
            yield pending[: len(pending) - hold]
            pending = pending[len(pending) - hold :]
    if pending:
        yield pending
