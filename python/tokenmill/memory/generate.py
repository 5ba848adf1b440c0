"""The seed's generate / generate_batch for memory-augmented models, over tokenmill's Model."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Sequence

from ..errors import InvalidArgumentError


def _check_device(model, device: str) -> None:
    backend = model.backend.split("-")[0]
    if device not in ("cpu", "cuda", "hip") or (device != backend):
        raise InvalidArgumentError(f"the model runs on '{backend}'; device={device!r} (load it with device=... instead)")


@contextmanager
def _routing(model, routing, router):
    """Temporarily the routing a strategy name or an inference router asks for."""
    memory = getattr(model, "memory", None)
    if routing is None and router is None:
        yield
        return
    if memory is None:
        raise InvalidArgumentError("routing needs a model with memory layers (tokenmill.load(base, memory=DIR))")
    before = (memory.strategy, memory.top_k, memory.window_size)
    if router is not None:
        model.set_routing(router.strategy, router.top_k, router.window_size)
    else:
        model.set_routing(routing)
    try:
        yield
    finally:
        model.set_routing(*before)


def _encode(model, tokenizer, prompt):
    if tokenizer is None or not isinstance(prompt, str):
        return prompt
    ids = tokenizer.encode(prompt)
    return list(getattr(ids, "ids", ids))


def _decode(model, tokenizer, ids) -> str:
    if tokenizer is None:
        return model.detokenize(ids, skip_special_tokens=True)
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _config(max_new_tokens, temperature, top_p, top_k, do_sample, seed):
    return dict(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0, top_p=top_p,
                top_k=top_k, min_p=0.0, seed=seed)


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9,
             top_k: int = 50, do_sample: bool = True, device: str = "cpu", *, routing: Optional[str] = None,
             router=None, seed: Optional[int] = None) -> str:
    """The new text after `prompt`. tokenizer: None (the model's own) or an object with encode /
    decode (a Hugging Face tokenizer); routing: a strategy name, or router: an inference router
    (routing.py), for this call only; do_sample=False is greedy."""
    _check_device(model, device)
    with _routing(model, routing, router):
        result = model.generate(_encode(model, tokenizer, prompt), details=True,
                                **_config(max_new_tokens, temperature, top_p, top_k, do_sample, seed))
    return _decode(model, tokenizer, result.token_ids)


def generate_batch(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 256, temperature: float = 0.7,
                   top_p: float = 0.9, top_k: int = 50, do_sample: bool = True, device: str = "cpu", *,
                   routing: Optional[str] = None, router=None, seed: Optional[int] = None) -> list:
    """generate for several prompts in one batch; the new texts in order."""
    _check_device(model, device)
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise InvalidArgumentError("prompts must be a list of strings")
    with _routing(model, routing, router):
        results = model.generate_batch([_encode(model, tokenizer, p) for p in prompts], details=True,
                                       **_config(max_new_tokens, temperature, top_p, top_k, do_sample, seed))
    return [_decode(model, tokenizer, r.token_ids) for r in results]
