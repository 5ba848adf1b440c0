"""What a SpeculativeGenerator verifies: drafts from prompt lookup (`LookupDrafter`), a draft model
(`ModelDrafter`), or lookup first and the model where it finds nothing (`HybridDrafter`)."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from ..engine.model import EngineModel
from ..errors import InvalidArgumentError
from .config import GenerateConfig
from .sequence import Sequence, evaluate

# Prompt lookup's acceptance depends on how long a stretch of the context its occurrence matches;
# on the grounded and open prompts of `tokenmill bench --speculative` (SmolLM2, greedy), per draft
# token verified: matches of 2-3 tokens 0.59, 4-7 0.73, 8-15 0.94, 16-31 0.98, 32 on 1.00. KPolicy
# keeps one acceptance per power-of-two class of the match, up to this length.
MATCH_CAP = 32


class Draft:
    """Proposed tokens and, for each, the distribution it was drawn from ((ids, probs)); None means a
    point mass at the token (greedy drafts, prompt lookup). catch_up_seconds: time the drafter spent
    on context it had not seen beyond one new token (a draft model's prefill of the prompt), a one-off
    that is not a cost per drafted token; that pass also gave the first draft. match: for prompt
    lookup, how many of the context's last tokens the earlier occurrence matches (up to MATCH_CAP)."""

    __slots__ = ("tokens", "dists", "catch_up_seconds", "match")

    def __init__(self, tokens: list[int], dists: Optional[list] = None, catch_up_seconds: float = 0.0,
                 match: int = 0):
        self.tokens = tokens
        self.dists = dists
        self.catch_up_seconds = catch_up_seconds
        self.match = match

    @property
    def timed(self) -> int:
        """The drafts whose drafting time is outside catch_up_seconds (all but the first after a catch-up)."""
        return len(self.tokens) - (1 if self.catch_up_seconds else 0)


class LookupDrafter:
    """Prompt lookup: the continuation of the most recent earlier occurrence of the context's last
    n tokens, for n from ngram_max down to ngram_min. The index of n-grams grows with the context
    (O(1) per new token) and is rebuilt only when the context changed before its end."""

    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self._indexed = np.zeros(0, np.int32)   # the context the index describes
        self._index: dict[bytes, int] = {}      # n-gram bytes -> start of its latest occurrence

    def _update(self, history: np.ndarray) -> None:
        n_old = len(self._indexed)
        if len(history) < n_old or not np.array_equal(history[:n_old], self._indexed):
            self._index.clear()
            n_old = 0
        # an n-gram is indexed once a token follows it (ends at p <= len - 2)
        for end in range(max(n_old - 1, 0), len(history) - 1):
            for n in range(self.ngram_min, self.ngram_max + 1):
                start = end - n + 1
                if start >= 0:
                    self._index[history[start : end + 1].tobytes()] = start
        self._indexed = history.copy()

    def propose(self, history: np.ndarray, k: int) -> Draft:
        self._update(history)
        L = len(history)
        for n in range(min(self.ngram_max, L - 1), self.ngram_min - 1, -1):
            start = self._index.get(history[L - n :].tobytes())
            if start is not None:
                # how far back the occurrence matches: drafts after a long match are mostly right
                match = n
                while match < MATCH_CAP and start - 1 - (match - n) >= 0 and \
                        history[start - 1 - (match - n)] == history[L - 1 - match]:
                    match += 1
                return Draft(history[start + n : start + n + k].tolist(), match=match)
        return Draft([])


class ModelDrafter:
    """A draft model's own sequence (cache, history, sampler), kept equal to the target's context:
    it drafts k tokens one decode step at a time, each drawn with the same sampling settings. The
    draft runs its base weights: the target's adapter is the target's (verification keeps the
    output the target's own either way)."""

    def __init__(self, model: EngineModel, config: GenerateConfig):
        self.model = model
        self.seq = Sequence(model, config.replace(adapter=None))
        self.greedy = config.sampling.temperature == 0

    def sync(self, history: np.ndarray) -> None:
        """Makes the draft context equal to `history`, keeping the cached common prefix."""
        mine = self.seq.history.view()
        m = min(len(mine), len(history))
        diff = np.flatnonzero(mine[:m] != history[:m])
        common = int(diff[0]) if diff.size else m
        if common < len(mine):
            self.seq.rollback(len(mine) - common)
        if len(history) > common:
            self.seq.extend(history[common:].tolist(), room=0)
            self.seq.logits = None

    def propose(self, history: np.ndarray, k: int) -> Draft:
        self.sync(history)
        seq = self.seq
        k = min(k, seq.capacity - len(seq.history))
        catch_up = 0.0
        if k > 0 and len(seq.history) - seq.cache.n_past > 1:   # a prefill, not a draft step: timed apart
            t0 = time.perf_counter()
            evaluate(self.model, [seq])
            catch_up = time.perf_counter() - t0
        tokens, dists = [], None if self.greedy else []
        for _ in range(k):
            evaluate(self.model, [seq])
            if self.greedy:
                token = seq.sample()
            else:
                ids, probs = seq.sampler.distribution(seq.logits, seq.history.view())
                token = int(seq.sampler.draw(ids, probs))
                dists.append((ids, probs))
            tokens.append(token)
            seq.append(token)
        return Draft(tokens, dists, catch_up)


class HybridDrafter:
    """Prompt lookup first; the draft model where lookup finds no match."""

    def __init__(self, lookup: LookupDrafter, model: ModelDrafter):
        self.lookup, self.model = lookup, model

    def propose(self, history: np.ndarray, k: int) -> Draft:
        draft = self.lookup.propose(history, k)
        return draft if draft.tokens else self.model.propose(history, k)


def same_vocabulary(target: EngineModel, draft: EngineModel) -> None:
    """A draft must speak the target's vocabulary: the same size and, where both have tokenizers,
    the same token strings."""
    if draft.n_vocab != target.n_vocab:
        raise InvalidArgumentError(
            f"the draft model's vocabulary has {draft.n_vocab} tokens, the target's {target.n_vocab}; "
            "a draft must share the target's vocabulary"
        )
    if target.tokenizer is not None and draft.tokenizer is not None:
        a, b = target.tokenizer.hf.get_vocab(), draft.tokenizer.hf.get_vocab()
        if a != b:
            differ = sorted(set(a.items()) ^ set(b.items()))[:3]
            raise InvalidArgumentError(f"the draft model's tokens differ from the target's (e.g. {differ})")
