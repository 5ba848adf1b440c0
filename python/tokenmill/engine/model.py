"""The owning wrappers over the native core: `EngineModel` (a loaded model with its tokenizer, KV
caches, forward passes and samplers) and `KVCache`. Generation and every later layer use these and
never the bindings.

Layers: `_core` (bindings, through `engine.native`) -> `EngineModel` (this module) -> generation ->
`tokenmill.Model` (the friendly API: generate, chat, batches)."""

from __future__ import annotations

import os
import stat
from collections import namedtuple
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from ..errors import ContextOverflowError, InvalidArgumentError, ModelFileError, ModelFormatError, TokenmillError
from ..text.tokenizer import Tokenizer, tokenizer_from_gguf_metadata, tokenizer_from_hf_dir
from . import hf, native
from .adapters import AdapterInfo, AdapterRegistry, AdapterSpec
from .cache import CacheSpec
from .default_model import resolve_default

# weight types a model can be converted to on load (and written by convert / merge / export)
WEIGHT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
# values per block of each; a K-quant target falls back, for matrices whose rows are not whole
# super-blocks, to the legacy type of about its size (what llama-quantize does)
WEIGHT_BLOCK = {"q8_0": 32, "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q4_k": 256, "q5_k": 256, "q6_k": 256}
K_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def matrix_type(wtype: str, cols: int) -> Optional[str]:
    """The type a matrix with rows of `cols` values gets when `wtype` is asked for: wtype, its K-quant
    fallback, or None when neither fits the rows."""
    for t in (wtype, K_FALLBACK.get(wtype)):
        if t is not None and cols % WEIGHT_BLOCK.get(t, 1) == 0:
            return t
    return None

ForwardResult = namedtuple("ForwardResult", "logits hidden layers")
ForwardResult.__doc__ = """What a forward pass returned: logits [rows, n_vocab] or None, final hidden
states [rows, n_embd] or None, and {layer: residual stream [rows, n_embd]}."""

PathLike = Union[str, os.PathLike]


class KVCache:
    """One sequence's keys and values, for up to `capacity` tokens of a model; memory grows with
    use (`allocated`, `bytes`). Serves one caller at a time: a second concurrent use raises
    InvalidArgumentError."""

    __slots__ = ("native", "spec")

    def __init__(self, native_cache, spec: CacheSpec):
        self.native = native_cache
        self.spec = spec

    @property
    def capacity(self) -> int:
        return self.native.capacity

    @property
    def allocated(self) -> int:
        return self.native.allocated

    @property
    def n_past(self) -> int:
        return self.native.n_past

    @property
    def bytes(self) -> int:
        return self.native.bytes

    @property
    def config(self):
        return self.native.config

    def truncate(self, n: int) -> None:
        """Forgets everything after the first n tokens."""
        self.native.truncate(n)

    def reserve(self, n: int) -> None:
        """Allocates memory for n tokens now (n <= capacity)."""
        self.native.reserve(n)

    @property
    def block_table(self) -> list[int]:
        """A paged cache's blocks in the pool, in position order."""
        return list(self.native.block_table)

    def adopt(self, blocks: Sequence[int], n_tokens: int) -> None:
        """An empty paged cache takes over the first n_tokens positions of shared blocks."""
        self.native.adopt(list(blocks), n_tokens)


class KVPool:
    """One fixed budget of KV memory in blocks of block_size positions, shared by paged caches
    (EngineModel.new_paged_cache); blocks are reference-counted, so caches share prompt prefixes."""

    def __init__(self, native_pool, spec: CacheSpec):
        self.native = native_pool
        self.spec = spec

    @property
    def n_blocks(self) -> int:
        return self.native.n_blocks

    @property
    def block_size(self) -> int:
        return self.native.block_size

    @property
    def free_blocks(self) -> int:
        return self.native.free_blocks

    @property
    def bytes(self) -> int:
        return self.native.bytes

    def retain(self, block: int) -> None:
        self.native.retain(block)

    def release(self, block: int) -> None:
        self.native.release(block)

    def refcount(self, block: int) -> int:
        return self.native.refcount(block)


def _check_file(p: Path) -> None:
    """A regular file we may read, checked before anything opens it (a FIFO would block)."""
    try:
        st = p.stat()
    except OSError as exc:
        raise ModelFileError(f"cannot open '{p}': {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"'{p}' is not a regular file")


def load_parts(path: Optional[PathLike], *, n_threads: Optional[int], tokenizer: Optional[PathLike],
               weights: Optional[str], int8_prefill: bool, device: str, int8_decode: bool = False):
    """(native model, tokenizer or None, path) for a GGUF file or an HF directory; see tokenmill.load."""
    if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1):
        raise InvalidArgumentError(f"n_threads must be a positive integer, got {n_threads!r}")
    if n_threads is not None and n_threads > native.available_cpus():
        raise InvalidArgumentError(
            f"n_threads={n_threads} exceeds the {native.available_cpus()} CPUs this process may use "
            "(more threads only spin against each other)"
        )
    if weights is not None and weights not in WEIGHT_TYPES:
        raise InvalidArgumentError(f"weights must be one of {', '.join(WEIGHT_TYPES)}, got {weights!r}")
    for name, flag in (("int8_prefill", int8_prefill), ("int8_decode", int8_decode)):
        if not isinstance(flag, bool):
            raise InvalidArgumentError(f"{name} must be True or False, got {flag!r}")
    if not isinstance(device, str):
        raise InvalidArgumentError(f"device must be a string such as 'cpu', got {device!r}")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(f"path must be a file or directory path, got {type(path).__name__}")
    threads = n_threads or 0
    p = Path(path) if path is not None else resolve_default()
    if p.is_dir():
        hparams = hf.hparams_from_config(hf.read_config(p))
        model = native.load_safetensors(hf.safetensors_files(p), hparams, threads, weights or "", int8_prefill, device,
                                        int8_decode)
        tok = tokenizer_from_hf_dir(p)
    elif p.exists():
        _check_file(p)
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelFormatError(f"'{p}' is neither a GGUF file nor a Hugging Face model directory")
        gguf = native.open_gguf(str(p))
        model = native.load_gguf(str(p), threads, weights or "", int8_prefill, device, int8_decode)
        meta = gguf.metadata() if tokenizer is None else {}
        tok = tokenizer_from_gguf_metadata(meta) if "tokenizer.ggml.model" in meta else None
    else:
        raise FileNotFoundError(f"no model at '{p}'")
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    return model, tok, str(p)


def load_tokenizer(path: PathLike) -> Tokenizer:
    """A tokenizer from a tokenizer.json, an HF directory holding one, or a GGUF file's vocabulary."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(f"tokenizer must be a path, got {type(path).__name__}")
    p = Path(path)
    if p.is_dir():
        tok = tokenizer_from_hf_dir(p)
    elif p.exists():
        _check_file(p)
        if p.name.endswith(".json"):
            tok = tokenizer_from_hf_dir(p.parent) if p.name == "tokenizer.json" else None
            if tok is None:
                tok = Tokenizer.from_file(p)
        else:
            tok = tokenizer_from_gguf_metadata(native.open_gguf(str(p)).metadata())
    else:
        raise FileNotFoundError(f"no tokenizer at '{p}'")
    if tok is None:
        raise ModelFormatError(f"no tokenizer.json in '{p}'")
    return tok


class EngineModel:
    """A loaded model with its tokenizer: text <-> ids, KV caches, forward passes, samplers.
    Thread-safe: forward passes are serialised natively (a cache serves one caller at a time)."""

    def __init__(self, native_model, tokenizer: Optional[Tokenizer], path: str, n_ctx: Optional[int] = None):
        self._native = native_model
        self.tokenizer = tokenizer
        self.path = path
        train_ctx = native_model.hparams.n_ctx_train
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1):
            raise InvalidArgumentError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        self.n_ctx = min(n_ctx, train_ctx) if n_ctx else train_ctx
        self._adapters = AdapterRegistry(native_model)
        self.memory = None   # the memory layers (engine.memory.AttachedMemory), once attached

    def __repr__(self) -> str:
        hp = self.hparams
        return f"<tokenmill.Model {hp.arch} {self.n_params / 1e6:.0f}M params from '{self.path}'>"

    # ---- facts
    @property
    def hparams(self):
        return self._native.hparams

    @property
    def n_vocab(self) -> int:
        return self._native.hparams.n_vocab

    @property
    def n_layer(self) -> int:
        return self._native.hparams.n_layer

    @property
    def n_embd(self) -> int:
        return self._native.hparams.n_embd

    @property
    def n_params(self) -> int:
        return self._native.n_params

    @property
    def weight_bytes(self) -> int:
        return self._native.weight_bytes

    @property
    def n_threads(self) -> int:
        return self._native.n_threads

    @property
    def backend(self) -> str:
        """The backend's name, e.g. "cpu-avx512"."""
        return self._native.backend

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

    def check_ids(self, ids, what: str = "token ids") -> list[int]:
        """ids as a list of ints, each an integer (not a bool or float) in [0, n_vocab)."""
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
                raise InvalidArgumentError(f"{what} must be a 1-D array of integers, got {ids.dtype} with shape {ids.shape}")
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
            raise InvalidArgumentError(f"{what} must be a list of integer token ids, got {type(ids).__name__}")
        vocab = self.n_vocab
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise InvalidArgumentError(f"{what}[{i}] must be an integer token id, got {type(t).__name__}")
            if not 0 <= t < vocab:
                raise InvalidArgumentError(f"{what}[{i}] = {t} is outside the vocabulary [0, {vocab})")
        return [int(t) for t in ids]

    # ---- caches and forward passes
    def new_cache(self, capacity: Optional[int] = None, spec: Optional[CacheSpec] = None,
                  reserve: Optional[int] = None) -> KVCache:
        """An empty KV cache for `capacity` tokens (default: the context), stored as `spec` says.
        Memory for `reserve` tokens is allocated now (default: all of them); the rest as needed."""
        spec = spec or CacheSpec()
        cap = self.n_ctx if capacity is None else capacity
        return KVCache(native.new_cache(self._native, cap, spec.native(), -1 if reserve is None else reserve), spec)

    def new_pool(self, n_blocks: int, block_size: int = 16, spec: Optional[CacheSpec] = None) -> KVPool:
        """A KV pool of n_blocks blocks of block_size positions stored as `spec` says (no fp16 ring)."""
        spec = spec or CacheSpec()
        return KVPool(native.new_pool(self._native, n_blocks, block_size, spec.native()), spec)

    def pool_blocks(self, budget_mb: float, block_size: int = 16, spec: Optional[CacheSpec] = None) -> int:
        """How many blocks of block_size positions a budget of budget_mb MB holds."""
        per_block = self._native.kv_block_bytes(block_size, (spec or CacheSpec()).native())
        return int(budget_mb * 2**20 // per_block)

    def new_paged_cache(self, pool: KVPool, capacity: Optional[int] = None) -> KVCache:
        """An empty cache for up to `capacity` tokens (default: the context) living in the pool's blocks."""
        return KVCache(native.new_cache(pool.native, self.n_ctx if capacity is None else capacity, None, -1), pool.spec)

    def kv_bytes_per_token(self, kind: str = "fp32", v_kind: Optional[str] = None, fp16_prefix_layers: int = 0) -> int:
        """Bytes of K and V a cache of this kind stores per token, over all layers."""
        spec = CacheSpec(kind, v_kind or kind, fp16_prefix_layers=fp16_prefix_layers)
        return self._native.kv_bytes_per_token(spec.native())

    def kv_cache_bytes(self, capacity: int, spec: CacheSpec) -> int:
        """Bytes a full cache of `capacity` tokens of this spec holds."""
        return self._native.kv_cache_bytes(capacity, spec.native())

    def supports_cache_kind(self, kind: str, v_kind: Optional[str] = None) -> bool:
        """Whether this model's head size suits the kind (block kinds need multiples of 32)."""
        try:
            self.kv_bytes_per_token(kind, v_kind)
        except InvalidArgumentError:
            return False
        return True

    def eval(self, cache: KVCache, inputs, logits="last", hidden=None, layers: Optional[Mapping] = None,
             decode_exact: bool = False, batch_invariant: bool = False, decode_rows: int = 0,
             adapter: AdapterSpec = None) -> ForwardResult:
        """Appends `inputs` (token ids, or float embeddings [n, n_embd]) to the cache in one forward
        pass. logits / hidden / each value of layers ({layer: rows}) choose rows: "last", "all",
        None, or row indices. decode_exact: every row's outputs are bit for bit those of feeding
        its token alone (one decode step), e.g. to verify drafted tokens. adapter: a loaded adapter's
        name, a {name: scale} mix, or None (the base model); the cache must hold only tokens computed
        with the same choice."""
        return self.eval_batch([cache], [inputs], logits, hidden, layers, adapters=[self.adapter_slot(adapter)],
                               decode_exact=decode_exact, batch_invariant=batch_invariant, decode_rows=decode_rows)

    def eval_batch(self, caches: Sequence[KVCache], inputs: Sequence, logits="last", hidden=None,
                   layers: Optional[Mapping] = None, adapters: Optional[Sequence[int]] = None,
                   decode_exact: bool = False, batch_invariant: bool = False, decode_rows: int = 0) -> ForwardResult:
        """One forward pass over several sequences: inputs[i] is appended to caches[i]; rows are
        numbered across the batch in order ("last" means the last row of each sequence).
        batch_invariant: each sequence's outputs do not depend on the others in the pass, nor on how
        its tokens were split into passes (the scheduler's mode); its first decode_rows rows are decode
        steps (one token per sequence, computed as a lone decode step), the rest prompt rows.
        adapters: one adapter slot per sequence (adapter_slot; -1 the base model)."""
        if isinstance(caches, KVCache) or not isinstance(caches, (list, tuple)):
            raise InvalidArgumentError("caches must be a list of KVCache")
        bad = [i for i, c in enumerate(caches) if not isinstance(c, KVCache)]
        if bad:
            raise InvalidArgumentError(f"caches[{bad[0]}] is a {type(caches[bad[0]]).__name__}, not a KVCache")
        if not isinstance(inputs, (list, tuple)):
            raise InvalidArgumentError("inputs must be a list with one token-id sequence per cache")
        out = native.forward(self._native, [c.native for c in caches], list(inputs), logits, hidden,
                             dict(layers) if layers is not None else None, adapters, decode_exact, batch_invariant,
                             decode_rows)
        return ForwardResult(*out)

    def logits(
        self,
        ids: Sequence[int],
        cache_kind: str = "fp32",
        chunk: Optional[int] = None,
        *,
        cache_kind_v: Optional[str] = None,
        residual_len: int = 0,
        fp16_prefix_layers: int = 0,
        adapter: AdapterSpec = None,
    ) -> np.ndarray:
        """Logits for every position: float32 [len(ids), n_vocab], teacher-forced.

        The tokens go `chunk` at a time (default: all at once) through a KV cache of `cache_kind`
        (`cache_kind_v` for V if different): with chunk=1 every position reads quantized K and V,
        as decoding does, which is what cache-quality evaluations need. adapter: as in eval."""
        ids = np.asarray(self.check_ids(ids, "ids"), dtype=np.int32)
        if ids.size == 0:
            raise InvalidArgumentError("ids must be a non-empty 1-D sequence of token ids")
        if ids.size > self.n_ctx:
            raise ContextOverflowError(f"{ids.size} tokens exceed the context of {self.n_ctx}")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise InvalidArgumentError(f"chunk must be a positive integer, got {chunk!r}")
        spec = CacheSpec(cache_kind, cache_kind_v or cache_kind, residual_len, fp16_prefix_layers)
        cache = self.new_cache(int(ids.size), spec)
        step = chunk or ids.size
        parts = [self.eval(cache, ids[i : i + step], "all", adapter=adapter).logits for i in range(0, ids.size, step)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def new_sampler(self, **params):
        """A native sampler over this vocabulary (see tokenmill.generation.config.SamplingConfig)."""
        return native.new_sampler(self.n_vocab, **params)

    # ---- adapters
    def load_adapter(self, path: PathLike, name: Optional[str] = None, scale: float = 1.0,
                     dtype: str = "auto") -> AdapterInfo:
        """Loads a LoRA adapter (a PEFT directory or a llama.cpp GGUF LoRA file) under `name` (default:
        the file or directory name); `scale` is what a request naming it alone applies. The base
        weights are untouched: requests choose an adapter, a mix or none (`adapter=`). `dtype`: how
        the adapter's weights are kept -- "auto": fp16 where it holds a pair's values exactly (an
        adapter saved in f16), else f32; "f16": rounded to fp16 (half the bytes a decode step
        streams, as llama.cpp's f16 LoRA files keep them)."""
        return self._adapters.load(path, name, scale, dtype)

    def unload_adapter(self, name: str) -> None:
        self._adapters.unload(name)

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        """name -> AdapterInfo of every loaded adapter."""
        return self._adapters.infos()

    def adapter_key(self, adapter: AdapterSpec) -> tuple:
        """A request's adapter choice as sorted (name, scale) pairs (() = the base model); checks it."""
        return self._adapters.canonical(adapter)

    def adapter_slot(self, adapter: AdapterSpec) -> int:
        """The native slot for an adapter choice (eval_batch's `adapters`); -1 is the base model."""
        return self._adapters.slot(adapter)

    # ---- memory layers (memory-augmented models)
    def attach_memory(self, source: PathLike):
        """Adds the memory layers of a trainer checkpoint directory (config.yaml + model.safetensors)
        or of a GGUF written by tokenmill.memory.export_to_gguf; returns them (also `self.memory`).
        Caches that already hold tokens cannot continue under memory (their positions lack its state)."""
        from .memory import attach_from_directory, attach_from_gguf

        if self.memory is not None:
            raise InvalidArgumentError(f"the model already has memory layers (from '{self.memory.source}')")
        p = Path(source)
        mem = attach_from_directory(self, p) if p.is_dir() else attach_from_gguf(self, p)
        if mem is None:
            raise ModelFormatError(f"'{p}' holds no memory layers")
        self.add_extension(mem.native)
        self.memory = mem
        return mem

    def set_routing(self, strategy: str, top_k: Optional[int] = None, window_size: Optional[int] = None) -> None:
        """Chooses how the memory layers route chapters from now on: "sequence", "rolling", "token" or
        "hybrid", with top_k routed chapters and the rolling window (None keeps the current value)."""
        if self.memory is None:
            raise InvalidArgumentError("the model has no memory layers (tokenmill.load(base, memory=DIR))")
        self.memory.set_routing(strategy, top_k, window_size)

    # ---- extensions (adapters, memory layers)
    def add_extension(self, extension) -> None:
        self._native.add_extension(extension)

    def remove_extension(self, extension) -> None:
        self._native.remove_extension(extension)

    @property
    def native(self):
        """The native model, for native extensions that are built against it (tokenmill._testing)."""
        return self._native
