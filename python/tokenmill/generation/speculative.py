"""Speculative decoding: a drafter proposes up to k tokens, the target checks them all in one
forward pass, and accepted tokens cost a fraction of a decode step each.

Exactness. The verification pass runs with decode_exact: each of its k+1 rows is computed with the
arithmetic of a one-token decode step, bit for bit, so greedy speculative output is the target's own
greedy output, token for token (cache kinds and fp16 rings included: a row reads the ring as it would
alone). With sampling, drafts are accepted by the rule of Leviathan et al. / Chen et al.:

    accept x_i with probability min(1, p_i(x_i) / q_i(x_i))
    on the first rejection, draw from max(0, p_i - q_i), renormalised; if all k are accepted and
    spec_extra_token, draw one more token from p_k

where p_i and q_i are the target's and the drafter's distributions after the same sampler pipeline
(penalties over the same history, logit bias, temperature, top-k / top-p / min-p / typical-p), so each
new token has exactly the distribution plain sampling would give it. Prompt lookup drafts are a point
mass (q = 1 at x): accepted with probability p(x), else drawn from p without x.

Drafters (drafters.py): another model with the same vocabulary (`ModelDrafter`: a smaller model, or
the target's file loaded with cheaper weights), prompt lookup (`LookupDrafter`: the latest n-gram
matched against the context, longest first, the most recent occurrence), or both (lookup first, the
model when lookup finds nothing: spec_lookup_first).

Adaptive k (spec_k_adaptive, `KPolicy`): each step takes the k in [spec_k_min, spec_k_max] with the
most expected tokens per second, from what this generator measured: the per-token acceptance alpha
(an average over the drafts verified: each accepted one and the first rejected, starting from 0.5 as
if two had been), the cost C(T) of a pass of T rows (the median of the recent passes of each T
measured, plain decode steps as T = 1, linear in between and beyond; kept per target model, so a new
generator on a model that has verified before needs no warm-up probes) and the drafter's cost per token:

    E(k) = (1 - alpha^(k+1)) / (1 - alpha)        tokens a step yields (accepted drafts + 1)
    rate(k) = E(k) / (C(k + 1) + k c_draft)        against plain decoding's 1.1 / C(1)

(C is far from a line: on SmolLM2 a second exact row costs 0.78 of a step, the rows from the fifth
on 0.55 each; a line through all of them made k = 1 look as if it paid from alpha = 0.59, where it
breaks even at 0.78. The 10 % margin covers noise in the medians.) With a draft model, when no k
beats plain decoding it decodes plainly for spec_probe_interval tokens (doubling from the second
failed probe on: a first one may just have come a little early, as for output that falls into a
loop some tokens after the first fallback), then probes again at k = 2 -- unless the last step had all its drafts accepted and
yielded its tokens faster than plain decoding would have: the averages lag behind drafts that have
just started to hit (output that fell into a loop, a passage being copied), so it probes on. (Only
whole hits count: a draft model that agrees half the time has half its k = 2 probes paying too, and
probing on after each of those cost it 3-7 %.) Without adaptation k stays spec_k.
Either way, when the acceptance over the last 64 proposed tokens (measured from 16 on) is below
spec_disable_below_accept, the next spec_probe_interval tokens are decoded plainly, then drafting
resumes with a fresh window.

Prompt lookup drafts for free, so with adaptive k it drafts first at every step and takes the k
its draft makes best, plain decoding included -- no fallback stretch to sit out -- from the
acceptance of the draft's match class (how far back its occurrence matches the context, in powers
of two: after a long match nearly every draft token is right, after two or three tokens fewer than
two in three are). Its plain steps still check lookup's next token against the token decoded, which
updates the acceptances for free, and during a spec_disable_below_accept fallback three hits in a
row end it early when drafting pays again (with a fixed k: alpha at least the threshold). On the
grounded prompts of `tokenmill bench --speculative` plain tokens fell from 71 to 8 of 128 (extract)
and from 37 to 10 (repeat) with the shadow checks, and the match classes took rewrite-code from
1.82x to 1.98x plain decoding (same process, alternated)."""

from __future__ import annotations

import collections
import statistics
import time
import weakref
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from ..engine.model import EngineModel
from ..errors import InvalidArgumentError
from .config import SPECULATIVE_FIELDS, GenerateConfig, SpeculativeConfig
from .drafters import MATCH_CAP, Draft, HybridDrafter, LookupDrafter, ModelDrafter, same_vocabulary
from .generator import Generator
from .result import SpeculativeStats
from .run import Event, Run
from .sequence import check_model

if TYPE_CHECKING:
    from .config import SpeculativeOptions

WINDOW_PROPOSALS = 64   # acceptance is measured over this many recent proposals ...
MIN_PROPOSALS = 16      # ... from this many on
# Plain tokens before the first probe after a fallback (spec_probe_interval None). A draft model's
# probe first prefills every token decoded meanwhile, so it probes less often: SmolLM2 f16 drafted
# for by its q4_0 copy (56 % agreement) ran 0.87-0.90x of plain decoding with probes every 32 tokens,
# 0.94-0.95x with 128.
LOOKUP_PROBE_INTERVAL = 32
MODEL_PROBE_INTERVAL = 128
# Prompt lookup drafts for free, so during plain decoding it keeps proposing one token in the shadow
# and checks it against the token decoded; this many hits in a row (and an acceptance estimate that
# makes drafting pay) end a fallback early. One or two are too often common words on open prompts.
SHADOW_HITS_TO_RESUME = 3


def _prob_of(dist, token: int) -> float:
    ids, probs = dist
    hit = np.flatnonzero(ids == token)
    return float(probs[hit[0]]) if hit.size else 0.0


def _residual(p, q, x: int):
    """max(0, p - q) renormalised, q a distribution (ids, probs) or None for a point mass at x."""
    ids, probs = p
    probs = probs.copy()
    if q is None:
        probs[ids == x] = 0.0
    else:
        q_dense = np.zeros(int(max(ids.max(), q[0].max())) + 1)
        q_dense[q[0]] = q[1]
        probs = np.maximum(probs - q_dense[ids], 0.0)
    total = probs.sum()
    if total <= 0.0:   # p <= q everywhere: only possible through rounding; p itself is the answer
        return p
    return ids, probs / total


# per target model: its passes' costs by row count, which every SpeculativeGenerator on it measures
# and reads (the model's and machine's property, not a generation's)
_PASS_RECORDS: "weakref.WeakKeyDictionary[EngineModel, dict]" = weakref.WeakKeyDictionary()


def _pass_record(model: EngineModel) -> dict:
    return _PASS_RECORDS.setdefault(model, {})


class KPolicy:
    """The adaptive choice of k (module docstring): exponential averages of the acceptance and of the
    drafter's cost per token, and the cost of a pass by its rows."""

    WARMUP_STEPS = 3    # speculative steps at PROBE_K before the model of costs is trusted
    PROBE_K = 2         # drafts of a step that only measures (warm-up, or a probe after plain decoding)
    HISTORY = 5         # recent passes of each row count whose median is its cost
    DECAY = 0.3         # weight of the newest step in the drafter's cost average
    TRIAL_DECAY = 0.15  # weight of the newest verified draft token in alpha's average
    # alpha's average starts from this acceptance worth this many trials (fading like older trials), not
    # from the first trial's 0 or 1: one lucky hit made alpha 1.0, and the misses after it brought it down
    # slowly enough that poor drafts went on being verified (open prompt "advice": 13 passes for 4 tokens)
    ALPHA_PRIOR = 0.5
    ALPHA_PRIOR_TRIALS = 2.0
    # a k must promise this much more than plain decoding: the measured costs are medians of a few
    # noisy passes, and a k that only breaks even on paper tends to lose (open prompt "advice", exact,
    # one run each: 0.93x plain decoding with no margin, 0.97x with this one)
    PAY_MARGIN = 1.1

    MATCH_DECAY = 0.9   # per trial, the weight the older trials of a match class keep
    MATCH_PRIOR = 2.0   # pseudo-trials at alpha that a match class's own estimate starts from

    def __init__(self, spec: "SpeculativeOptions", passes: Optional[dict] = None):
        """passes: the target model's record of pass costs (rows -> recent seconds), shared by its
        generators; a fresh one without."""
        self.spec = spec
        self.alpha: Optional[float] = None
        self.trials = self.ALPHA_PRIOR_TRIALS                   # decayed verified drafts (prior included)
        self.hits = self.ALPHA_PRIOR * self.ALPHA_PRIOR_TRIALS   # ... and of them accepted
        self.by_match: dict[int, list[float]] = {}   # match class -> [decayed trials, decayed hits]
        self.draft_cost = 0.0
        self.passes: dict[int, collections.deque] = {} if passes is None else passes   # rows -> seconds of recent passes
        # the probes that measure pass costs: none where the model's record already holds two row counts
        self.warmup_steps = 0 if len(self.passes) >= 2 else self.WARMUP_STEPS
        self.steps = 0
        self.timed_steps = 0   # steps that measured the drafter's cost per token

    def observe_pass(self, rows: int, seconds: float) -> None:
        self.passes.setdefault(rows, collections.deque(maxlen=self.HISTORY)).append(seconds)

    def has_plain_cost(self) -> bool:
        return 1 in self.passes

    def plain_seconds(self) -> float:
        """The median recent one-row pass: what a plainly decoded token costs."""
        return float(np.median(self.passes[1]))

    def observe_step(self, proposed: int, accepted: int, draft_seconds: float, timed: int, match: int = 0) -> None:
        """draft_seconds: the drafting time of the step's last `timed` drafts (a prefill excluded);
        match: the draft's lookup match length (0: not a lookup draft)."""
        # the drafts checked: each accepted one, and the first rejected (those after it were never
        # compared with the target) -- the trials of E(k)'s model, where a step's accepted / proposed
        # would count the unchecked ones as rejections
        for _ in range(accepted):
            self.observe_trial(True, match)
        if accepted < proposed:
            self.observe_trial(False, match)
        if timed > 0:
            per_token = draft_seconds / timed
            self.draft_cost = per_token if self.timed_steps == 0 else (1 - self.DECAY) * self.draft_cost + self.DECAY * per_token
            self.timed_steps += 1
        self.steps += 1

    def observe_trial(self, hit: bool, match: int = 0) -> None:
        self.trials = (1 - self.TRIAL_DECAY) * self.trials + 1.0
        self.hits = (1 - self.TRIAL_DECAY) * self.hits + hit
        self.alpha = self.hits / self.trials
        if match:
            counts = self.by_match.setdefault(self._match_class(match), [0.0, 0.0])
            counts[0] = self.MATCH_DECAY * counts[0] + 1.0
            counts[1] = self.MATCH_DECAY * counts[1] + hit

    @staticmethod
    def _match_class(match: int) -> int:
        return min(match, MATCH_CAP).bit_length()

    def alpha_for(self, match: int = 0) -> Optional[float]:
        """The acceptance expected of a draft: its match class's, drawn toward alpha while that class
        has few trials (lookup drafts), else alpha."""
        counts = self.by_match.get(self._match_class(match)) if match else None
        if counts is None or self.alpha is None:
            return self.alpha
        return (counts[1] + self.MATCH_PRIOR * self.alpha) / (counts[0] + self.MATCH_PRIOR)

    def pass_costs(self, max_rows: int) -> Optional[list[float]]:
        """C(T) for T = 0..max_rows (C(0) unused): the median of the recent passes of each T measured,
        linear between them, and beyond the largest at the slope of the least-squares line through
        them all; None before two row counts are measured. (Plain Python: a few points, each step.)"""
        if len(self.passes) < 2:
            return None
        rows = sorted(self.passes)
        secs = [statistics.median(self.passes[r]) for r in rows]
        mean_r, mean_s = statistics.fmean(rows), statistics.fmean(secs)
        slope = sum((r - mean_r) * (t - mean_s) for r, t in zip(rows, secs)) / sum((r - mean_r) ** 2 for r in rows)
        slope = max(slope, 1e-9)
        costs, j = [0.0], 0
        for t in range(1, max_rows + 1):
            while j + 1 < len(rows) and rows[j + 1] <= t:
                j += 1
            if t >= rows[-1]:
                costs.append(secs[-1] + slope * (t - rows[-1]))
            elif t <= rows[0]:
                costs.append(secs[0])
            else:   # rows[j] <= t < rows[j + 1]
                f = (t - rows[j]) / (rows[j + 1] - rows[j])
                costs.append(secs[j] + f * (secs[j + 1] - secs[j]))
        return costs

    def choose(self, k_limit: int, match: int = 0) -> int:
        """k for the next step (0: decode plainly), at most k_limit; match: the lookup draft's match
        length, whose class's acceptance then counts."""
        k_max = min(self.spec.k_max, k_limit)
        cost = self.pass_costs(k_max + 1)
        if self.steps < self.warmup_steps or cost is None or self.alpha is None:
            return min(self.PROBE_K, k_limit)
        alpha = min(self.alpha_for(match), 0.999)
        best_k, best_rate = 0, self.PAY_MARGIN / cost[1]   # plain decoding
        for k in range(self.spec.k_min, k_max + 1):
            rate = (1 - alpha ** (k + 1)) / (1 - alpha) / (cost[k + 1] + k * self.draft_cost)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k


class SpeculativeGenerator(Generator):
    """A Generator whose decoding drafts and verifies: the same API (generate, generate_iter,
    prefill, decode_step, rollback, reset; caches kept across calls), the same results for greedy
    decoding and the same distribution when sampling. `draft_model` is a Model with the target's
    vocabulary, or "lookup" for prompt lookup; with a model and spec_lookup_first, lookup is tried
    first. Statistics: `acceptance_rate` (over the generator's life) and `last.speculative`."""

    def __init__(self, target_model: EngineModel, draft_model: Union[EngineModel, str],
                 config: Optional[GenerateConfig] = None, **overrides: Any):
        check_model(target_model)
        if config is not None and not isinstance(config, GenerateConfig):
            raise InvalidArgumentError(f"config must be a SpeculativeConfig, got {type(config).__name__}")
        if config is not None and not isinstance(config, SpeculativeConfig):
            config = SpeculativeConfig(**{g: getattr(config, g) for g in GenerateConfig.GROUPS})
        config = (config or SpeculativeConfig()).replace(**overrides)
        super().__init__(target_model, config)
        self.spec: SpeculativeOptions = config.speculative
        lookup = LookupDrafter(self.spec.lookup_ngram_min, self.spec.lookup_ngram_max)
        if isinstance(draft_model, str):
            if draft_model != "lookup":
                raise InvalidArgumentError(f"draft_model must be a Model or 'lookup', got {draft_model!r}")
            self.drafter = lookup
        else:
            check_model(draft_model)
            same_vocabulary(target_model, draft_model)
            model_drafter = ModelDrafter(draft_model, config.generation_config())
            self.drafter = HybridDrafter(lookup, model_drafter) if self.spec.lookup_first else model_drafter
        self.k = self.spec.k
        self.policy = KPolicy(self.spec, _pass_record(target_model))
        self._probe_interval = self.spec.probe_interval or (
            LOOKUP_PROBE_INTERVAL if self.drafter is lookup else MODEL_PROBE_INTERVAL)
        self._backoff = self._probe_interval   # plain tokens before the next probe (doubles while probes fail)
        self._probe = False
        self._after_probe = False   # whether the last speculative step was a probe
        self._paid = False   # whether the last speculative step had all its drafts accepted, faster than plain decoding
        self._window: collections.deque = collections.deque()   # (proposed, accepted) of recent steps
        self._plain_left = 0                                      # tokens to decode plainly (fallback)
        self._shadow = lookup if self.drafter is lookup else None  # free drafts checked during plain steps
        self._shadow_hits = 0                                     # consecutive shadow hits
        self.proposed_total = 0
        self.accepted_total = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed drafted tokens over every generation of this generator."""
        return self.accepted_total / self.proposed_total if self.proposed_total else 0.0

    def start(self, input_ids=None, **overrides: Any) -> Run:
        config = self.config.replace(**{k: v for k, v in overrides.items() if k not in SPECULATIVE_FIELDS})
        if config.sampling.json_schema is not None or config.sampling.regex is not None:
            raise InvalidArgumentError("structured output (json_schema / regex) is not combined with speculative decoding")
        fixed = sorted(n for n in overrides if n == "speculative" or n in SPECULATIVE_FIELDS)
        if fixed:
            raise InvalidArgumentError(f"{', '.join(fixed)} are fixed when the SpeculativeGenerator is created")
        run = super().start(input_ids, **overrides)
        run.speculative = SpeculativeStats()
        return run

    # ---- one step of a run
    def _step(self, run: Run) -> list[Event]:
        seq = self._seq
        if run.limit_reached():
            return run.step()
        left = run.max_new_tokens - len(run.tokens) - len(run.held)
        room = seq.capacity - len(seq.history) - 1
        k_limit = min(left - 1 if self.spec.extra_token else left, room - 1)
        pending = len(seq.history) - seq.cache.n_past
        if self._plain_left > 0 and self._drafts_pay_again(k_limit):
            self._plain_left, self._probe = 0, True
            run.speculative.early_resumes += 1
        if self._plain_left > 0 or k_limit < 1 or seq.logits is not None or pending != 1:
            return self._plain_step(run)
        if self.spec.k_adaptive:
            if not self.policy.has_plain_cost():   # a plain decode step first: the baseline to beat
                return self._plain_step(run)
            if self._shadow is not None:
                return self._lookup_step(run, k_limit)
            if self._probe:   # after a stretch of plain decoding: measure again, cheaply
                self._probe, self._after_probe = False, True
                self.k = min(KPolicy.PROBE_K, k_limit)
            else:
                after_probe, self._after_probe = self._after_probe, False
                self.k = self.policy.choose(k_limit)
                if self.k == 0 and self._paid:
                    # the averages lag, but the last step's drafts all hit, faster than plain decoding
                    # (drafts that just started to hit, e.g. the output caught in a loop): probe on
                    self.k = min(KPolicy.PROBE_K, k_limit)
                elif self.k == 0:   # no k beats plain decoding: decode plainly, then probe; back off while it fails
                    self._plain_left, self._probe = self._backoff, True
                    if after_probe:
                        self._backoff = min(2 * self._backoff, 1024)
                    return self._plain_step(run)
                self._backoff = self._probe_interval
        k = min(self.k, k_limit)
        stats: SpeculativeStats = run.speculative
        t0 = time.perf_counter()
        draft = self.drafter.propose(seq.history.view(), k)
        t1 = time.perf_counter()
        stats.draft_seconds += t1 - t0
        if not draft.tokens:
            return self._plain_step(run)
        events = self._verify(run, draft, t1 - t0)
        stats.verify_seconds += time.perf_counter() - t1
        return events

    def _lookup_step(self, run: Run, k_limit: int) -> list[Event]:
        """Prompt lookup, adaptive: drafting costs nothing, so each step drafts first and takes the k
        its draft's match class makes best -- none (a plain step) for a short match on open text,
        long drafts from the first step of a long match, with no fallback stretch to sit out."""
        stats: SpeculativeStats = run.speculative
        t0 = time.perf_counter()
        draft = self.drafter.propose(self._seq.history.view(), min(self.spec.k_max, k_limit))
        t1 = time.perf_counter()
        stats.draft_seconds += t1 - t0
        self.k = self.policy.choose(k_limit, draft.match) if draft.tokens else 0
        if self.k == 0:
            return self._plain_step(run, draft)
        draft.tokens = draft.tokens[: self.k]
        events = self._verify(run, draft, t1 - t0)
        stats.verify_seconds += time.perf_counter() - t1
        return events

    def _plain_step(self, run: Run, shadow: Optional[Draft] = None) -> list[Event]:
        """A plain decode step; with prompt lookup, its next token (`shadow`, else proposed now) is
        checked against the token decoded."""
        seq = self._seq
        had_logits, pending = seq.logits is not None, len(seq.history) - seq.cache.n_past
        n = len(seq.history)
        if shadow is None and self._shadow and pending == 1 and not had_logits:
            shadow = self._shadow.propose(seq.history.view(), 1)
        t0 = time.perf_counter()
        events = super()._step(run)
        if not had_logits:
            run.speculative.plain_tokens += 1
            if pending == 1:   # a decode step: the cost of a one-row pass
                self.policy.observe_pass(1, time.perf_counter() - t0)
            if self._plain_left > 0:
                self._plain_left -= 1
        if shadow is not None and shadow.tokens and len(seq.history) == n + 1:   # the shadow draft against the token decoded
            hit = int(seq.history.view()[-1]) == shadow.tokens[0]
            self._shadow_hits = self._shadow_hits + 1 if hit else 0
            self.policy.observe_trial(hit, shadow.match)
        return events

    def _drafts_pay_again(self, k_limit: int) -> bool:
        """During a fallback: whether prompt lookup's shadow drafts say drafting pays again (the
        latest SHADOW_HITS_TO_RESUME hit in a row, and the acceptance they measured is worth drafting
        at: a k that beats plain decoding, or at least spec_disable_below_accept with a fixed k)."""
        if self._shadow_hits < SHADOW_HITS_TO_RESUME or k_limit < 1:
            return False
        if self.spec.k_adaptive:
            return self.policy.choose(k_limit) > 0
        return self.policy.alpha is not None and self.policy.alpha >= self.spec.disable_below_accept

    def _verify(self, run: Run, draft: Draft, draft_seconds: float) -> list[Event]:
        """One target pass over [pending token, drafts]; accepted drafts and one token from the
        target go through the run as if decoded one by one."""
        seq, stats, sampler = self._seq, run.speculative, run.sampler
        tokens = draft.tokens
        m = len(tokens)
        L = len(seq.history)
        t0 = time.perf_counter()
        rows = self.model.eval_batch([seq.cache], [np.concatenate([seq.history.view(L - 1), np.asarray(tokens, np.int32)])],
                                     logits="all", adapters=[seq.adapter_slot], decode_exact=True).logits   # [m + 1, vocab]
        # the histories rows i see: the context plus the first i drafts (the penalties' input)
        context = np.concatenate([seq.history.view(), np.asarray(tokens, np.int32)])
        greedy = run.config.sampling.temperature == 0
        n, next_token = 0, None
        for i in range(m):
            x = tokens[i]
            if greedy:
                best = int(sampler.sample(rows[i], context[: L + i]))
                if best == x:
                    n += 1
                    continue
                next_token = best
                break
            p = sampler.distribution(rows[i], context[: L + i])
            q = draft.dists[i] if draft.dists is not None else None
            qx = _prob_of(q, x) if q is not None else 1.0
            if sampler.uniform() * qx < _prob_of(p, x):    # u < min(1, p(x) / q(x))
                n += 1
                continue
            ids, probs = _residual(p, q, x)
            next_token = int(sampler.draw(ids, probs))
            break
        if n == m and self.spec.extra_token:
            next_token = int(sampler.sample(rows[m], context[: L + m]))
        # the cache keeps the pending token and the accepted drafts (the last one stays pending when
        # there is no token after it)
        seq.cache.truncate(L + n if next_token is not None else L + n - 1)
        events: list[Event] = []
        for i in range(n):
            events += run.push(tokens[i], rows[i])
            if run.done:
                break
        if not run.done and next_token is not None:
            events += run.push(next_token, rows[n])
        seq.logits = None
        seq.cache.truncate(min(seq.cache.n_past, len(seq.history) - 1))
        # the whole step, as a plain step is timed whole (its pass, sampling and events): timing the
        # pass alone made steps of few drafts look cheaper than they are
        step_seconds = time.perf_counter() - t0
        self.policy.observe_pass(m + 1, step_seconds)
        yielded = n + (next_token is not None)
        self._account(stats, m, n, draft, draft_seconds)
        self._paid = n == m and self.policy.has_plain_cost() and (
            yielded * self.policy.plain_seconds() > step_seconds + draft_seconds - draft.catch_up_seconds)
        return events

    def _account(self, stats: SpeculativeStats, proposed: int, accepted: int, draft: Draft, draft_seconds: float) -> None:
        stats.proposed += proposed
        stats.accepted += accepted
        stats.steps += 1
        stats.k_per_step.append(self.k)
        self.proposed_total += proposed
        self.accepted_total += accepted
        spec = self.spec
        self.policy.observe_step(proposed, accepted, draft_seconds - draft.catch_up_seconds, draft.timed, draft.match)
        self._window.append((proposed, accepted))
        while sum(p for p, _ in self._window) - self._window[0][0] >= WINDOW_PROPOSALS:
            self._window.popleft()
        if spec.disable_below_accept > 0:
            total = sum(p for p, _ in self._window)
            if total >= MIN_PROPOSALS and sum(a for _, a in self._window) < spec.disable_below_accept * total:
                self._plain_left = self._probe_interval
                self._window.clear()
