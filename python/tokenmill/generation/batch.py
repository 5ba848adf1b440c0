"""Batched generation: every step is one forward pass over all unfinished sequences (prompts of
different lengths prefill together), and finished ones leave the batch. Each cache holds what its
request can use (prompt + max_new_tokens, within max_seq_len), not the whole context."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence as Seq

from ..errors import InvalidArgumentError
from .config import GenerateConfig
from .result import GenerationResult
from .run import Run
from .sequence import Sequence, as_ids, check_model, evaluate

if TYPE_CHECKING:
    from ..engine.model import EngineModel


def generate_batch(model: "EngineModel", prompts: Seq, configs: Seq[GenerateConfig]) -> list[GenerationResult]:
    """Generates for several prompts at once, each with its own config (sampling parameters, seed,
    limits); returns one GenerationResult per prompt, in order."""
    check_model(model)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise InvalidArgumentError("prompts must be a list of prompts")
    if not isinstance(configs, (list, tuple)) or len(prompts) != len(configs):
        raise InvalidArgumentError("one config per prompt is needed")
    if not all(isinstance(c, GenerateConfig) for c in configs):
        raise InvalidArgumentError("configs must be GenerateConfig objects")
    if not prompts:
        return []
    seqs, runs = [], []
    for prompt, config in zip(prompts, configs):
        ids = as_ids(model, prompt, first=True)
        if not ids:
            raise InvalidArgumentError("a prompt in the batch is empty")
        seq = Sequence(model, config)
        seq.extend(ids, room=config.stopping.max_new_tokens)
        seq.reserve(config.stopping.max_new_tokens)
        seqs.append(seq)
        runs.append(Run(seq, config, prompt_tokens=len(ids)))
    active = list(range(len(seqs)))
    while active:
        evaluate(model, [seqs[i] for i in active if not runs[i].limit_reached()])
        for i in active:
            runs[i].step()
        active = [i for i in active if not runs[i].done]
    return [r.result() for r in runs]
