"""The friendly API: `load()` a model, then `tokenize`, `logits`, `generate`, `chat` and
`generate_batch`. `Model` is the engine's owning wrapper (tokenmill.engine.model.EngineModel) with
generation on top; generation itself is one internal token generator, and `stream=True` exposes it
as text pieces."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

from .engine.model import EngineModel, load_parts
from .errors import InvalidArgumentError
from .generation import GenerateConfig, Generator, SpeculativeConfig, SpeculativeGenerator, generate_batch
from .generation.config import SPECULATIVE_FIELDS
from .text.chat import render_chat

# Model.generate / chat / generate_batch follow llama.cpp's sampling defaults; GenerateConfig itself
# follows the seed's (temperature 1, no filters).
MODEL_SAMPLING_DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)
# ... and speculative decoding adapts k to the measured costs (the seed's default is a fixed k)
MODEL_SPEC_DEFAULTS = dict(spec_k_adaptive=True, spec_k=8)

Prompt = Union[str, Sequence[int]]


def load(
    path: Union[str, os.PathLike, None] = None,
    *,
    n_threads: Optional[int] = None,
    n_ctx: Optional[int] = None,
    tokenizer: Union[str, os.PathLike, None] = None,
    weights: Optional[str] = None,
    int8_prefill: bool = False,
    int8_decode: bool = False,
    device: str = "cpu",
    memory: Union[str, os.PathLike, None] = None,
) -> "Model":
    """Loads a GGUF file or a Hugging Face directory (config.json + safetensors + tokenizer.json).

    With no path, the default model (SmolLM2-135M-Instruct) is used, fetched on first use.
    `tokenizer` overrides the model's own: a tokenizer.json, an HF directory, or a GGUF file.
    `n_ctx` caps the context (default: the model's training context).
    `weights` converts every weight matrix on load to one of f32, f16, bf16, q8_0, q4_0, q4_1, q5_0,
    q5_1, q4_k, q5_k, q6_k (e.g. an f16 HF model to q8_0); the converted copy lives in memory, the file
    is only read. A K-quant gives matrices whose rows are no whole 256-value super-blocks q5_0 / q5_1 /
    q8_0 (as llama-quantize does); matrices whose rows fit no block keep their type, as `tokenmill
    convert` does.
    `int8_prefill` trades precision for prompt speed the way llama.cpp does: forward passes of 8 or
    more tokens (prompts, batches of 8+ sequences) multiply q4_0 / q4_1 / q8_0 / q5_0 / q5_1 / iq4_nl and
    K-quant (not q2_k) weights by activations rounded to int8 per 32-block (about twice the exact
    path's speed with AVX-512 VNNI or AVX2; logits move by a few percent of their range, as llama.cpp's
    do). Single-sequence decode, other weight types and the scalar level keep the exact float path. `int8_decode` makes the same trade in decode steps and
    rows computed as decode (q4_0 / q4_1 and q8_0 weights, llama.cpp's decode precision): a fast
    draft model, or batched decode throughput; those rows are still the model's own one-token steps.
    `device` chooses the backend: "cpu" (always built); "cuda" / "hip" where tokenmill was built with
    them (an unbuilt one is an UnsupportedModelError saying how to build it).
    `memory` adds memory layers (memory-augmented models, `tokenmill.memory`): a memory-transformer
    checkpoint directory (config.yaml + model.safetensors); a GGUF that carries its memory (written by
    tokenmill.memory.export_to_gguf) gets it without this argument."""
    native_model, tok, p = load_parts(path, n_threads=n_threads, tokenizer=tokenizer, weights=weights,
                                      int8_prefill=int8_prefill, int8_decode=int8_decode, device=device)
    model = Model(native_model, tok, p, n_ctx)
    if memory is not None:
        model.attach_memory(memory)
    elif os.path.isfile(p) and str(p).endswith(".gguf"):
        from .engine.memory import gguf_has_memory
        if gguf_has_memory(p):
            model.attach_memory(p)
    return model


class Model(EngineModel):
    """A loaded model with its tokenizer. Thread-safe: forward passes are serialised natively."""

    _embedder = None   # made on the first embed()

    def embed(self, texts: Sequence[str], pooling: Optional[str] = None, normalize: Optional[bool] = None,
              batch_tokens: int = 4096):
        """Embeddings of texts, numpy float32 [len(texts), n_embd]: encoders (BERT family) and decoders
        (final hidden states). pooling "mean", "cls" or "last" and normalize (L2) default to what a
        sentence-transformers directory says, else mean and True. See tokenmill.rag.embeddings."""
        if self._embedder is None:
            from .rag.embeddings import Embedder

            self._embedder = Embedder(self)
        return self._embedder.embed(texts, pooling, normalize, batch_tokens)

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        *,
        stream: bool = False,
        details: bool = False,
        draft: Union["Model", str, None] = None,
        **kwargs: Any,
    ):
        """Continues `prompt` (text or token ids) and returns the new text.

        Keywords are GenerateConfig fields (temperature, top_k, top_p, min_p, typical_p,
        repetition_penalty, presence_penalty, frequency_penalty, repeat_last_n, logit_bias, seed,
        stop, eos_token_id, ignore_eos, max_seq_len, context_overflow, logprobs, adapter); the sampling
        defaults here are llama.cpp's (temperature 0.8, top_k 40, top_p 0.95, min_p 0.05).
        stream=True returns an iterator of text pieces that never split a UTF-8 character;
        details=True returns a GenerationResult (text, token ids, finish reason, timings, logprobs).
        draft: speculative decoding with a draft Model of the same vocabulary, or "lookup" for prompt
        lookup, tuned by the SpeculativeConfig keywords (spec_k, spec_k_adaptive, ...): the same
        greedy output, the same sampling distribution, often faster (see SpeculativeGenerator).
        Ctrl-C stops a generation (within milliseconds, even inside a long prompt) and leaves the
        model usable."""
        self._require_tokenizer()
        if draft is not None:
            config = SpeculativeConfig(**{**MODEL_SAMPLING_DEFAULTS, **MODEL_SPEC_DEFAULTS, "max_new_tokens": max_new_tokens,
                                          **kwargs})
            gen = SpeculativeGenerator(self, draft, config)
        else:
            spec = sorted(k for k in kwargs if k in SPECULATIVE_FIELDS)
            if spec:
                raise InvalidArgumentError(f"{', '.join(spec)} need draft= (a draft Model or 'lookup')")
            gen = Generator(self, _model_config(max_new_tokens, kwargs))
        run = gen.start(prompt)
        if stream:
            return (piece for _, piece in gen.drive(run) if piece)
        for _ in gen.drive(run):
            pass
        return gen.last if details else gen.last.text

    def chat(self, messages: Sequence[Mapping[str, Any]], max_new_tokens: int = 256, **kwargs: Any):
        """Answers a conversation [{'role': 'user', 'content': ...}, ...] with the model's template."""
        return self.generate(self.chat_prompt(messages), max_new_tokens, **kwargs)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self._require_tokenizer().encode(self.chat_text(messages, add_generation_prompt), add_special_tokens=False)

    def chat_text(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The conversation rendered by the model's chat template (extra: template variables)."""
        tok = self._require_tokenizer()
        return render_chat(
            tok.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=tok.token_text(tok.bos_id) or "" if tok.bos_id is not None else "",
            eos_token=tok.token_text(tok.eos_ids[0]) or "" if tok.eos_ids else "",
            **extra,
        )

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
