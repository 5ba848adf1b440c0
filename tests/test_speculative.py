"""Speculative decoding: verification rows bit-identical to decode steps (every weight type, cache kind
and CPU level), greedy output token for token the target's own (prompt lookup, a quantized self-draft,
both; stop strings, EOS, logprobs, multi-turn, rollback), and with sampling the distribution of the
generated tokens equal to plain sampling (chi-square over many draws)."""

import numpy as np
import pytest
from scipy.stats import chi2_contingency

import tokenmill
from tokenmill import _core, CacheSpec, Generator, SpeculativeGenerator
from tokenmill.generation.speculative import KPolicy
from conftest import build_tiny

PASSAGE = ("The old lighthouse keeper climbed the stairs every night, lit the lamp and watched the sea. "
           "Ships passed in the dark, and the keeper wrote their names in a book. ")


@pytest.fixture(scope="module")
def self_draft(default_gguf):
    """The default model's own file with its weights converted to q4_0: a cheaper copy as draft."""
    return tokenmill.load(default_gguf, weights="q4_0")


def _peaked_tiny(directory, seed):
    """A tiny llama whose output head is scaled up, so its distributions are peaked like a trained
    model's (a random one is nearly uniform, which would make every draft test trivial)."""
    import torch

    model = build_tiny("llama", directory, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    model.save_pretrained(directory, safe_serialization=True)
    return tokenmill.load(directory)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny llama target and a different tiny llama (other weights, same vocabulary) as draft."""
    return _peaked_tiny(tmp_path_factory.mktemp("tiny-target"), 0), _peaked_tiny(tmp_path_factory.mktemp("tiny-draft"), 1)


# ---- the verification pass is decode, bit for bit

def _rows_equal_decode_steps(model, ids, cache_spec):
    """At every CPU level, a decode_exact pass over 17 rows gives the logits of 17 decode steps."""
    for level in _core.cpu_levels():
        _core.set_cpu_level(level)
        try:
            one, batch = model.new_cache(64, cache_spec), model.new_cache(64, cache_spec)
            model.eval(one, ids[:40], logits=None)
            model.eval(batch, ids[:40], logits=None)
            steps = np.stack([model.eval(one, [t], hidden="last").logits[0] for t in ids[40:57]])
            verify = model.eval(batch, ids[40:57], logits="all", decode_exact=True).logits
        finally:
            _core.set_cpu_level(_core.cpu_levels()[-1])
        np.testing.assert_array_equal(verify, steps, err_msg=f"{cache_spec} at {level}")


@pytest.mark.parametrize("weights", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("spec", [("fp32", "fp32", 0), ("bf16", "fp16", 6)])
def test_verification_rows_equal_decode_steps(tiny_models, weights, spec):
    model = tokenmill.load(tiny_models["qwen2"][0], weights=weights)
    ids = np.random.default_rng(0).integers(0, 320, size=60).tolist()
    _rows_equal_decode_steps(model, ids, CacheSpec(*spec[:2], residual_len=spec[2]))


@pytest.mark.parametrize("spec", [("q8", "q8", 0), ("q4", "nf4", 6)])
def test_verification_rows_equal_decode_steps_quantized_caches(smollm, spec):
    ids = smollm.tokenize(PASSAGE * 2)[:60]
    _rows_equal_decode_steps(smollm, ids, CacheSpec(*spec[:2], residual_len=spec[2]))


# ---- greedy: the target's own output

PROMPTS = [
    "Copy this sentence exactly: " + PASSAGE + "\nCopy: The old lighthouse keeper",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
]


def _greedy(model, **kw):
    return dict(temperature=0, max_new_tokens=kw.pop("max_new_tokens", 40), **kw)


@pytest.mark.parametrize("cache", [dict(), dict(cache_kind="q8"), dict(cache_kind="q4", cache_residual_len=8)])
@pytest.mark.parametrize("drafter", ["lookup", "self", "self+lookup"])
def test_greedy_output_is_the_targets_own(smollm, self_draft, drafter, cache):
    draft = "lookup" if drafter == "lookup" else self_draft
    extra = dict(spec_lookup_first=True) if drafter == "self+lookup" else {}
    for prompt in PROMPTS[: 2 if cache else 3]:
        ids = smollm.tokenize(prompt)
        plain = Generator(smollm, **_greedy(smollm, **cache)).generate(ids)
        spec = SpeculativeGenerator(smollm, draft, spec_k=5, spec_k_adaptive=True, **_greedy(smollm, **cache), **extra)
        assert spec.generate(ids) == plain, (drafter, cache, prompt)
        assert spec.last.speculative.proposed > 0


def test_stop_strings_eos_and_logprobs_match(smollm):
    ids = smollm.tokenize(PROMPTS[0])
    kw = dict(temperature=0, max_new_tokens=60, stop=["night"], logprobs=3)
    plain = Generator(smollm, **kw)
    spec = SpeculativeGenerator(smollm, "lookup", spec_k=6, **kw)
    assert spec.generate(ids) == plain.generate(ids)
    assert spec.last.finish_reason == plain.last.finish_reason == "stop"
    assert [(lp.token, lp.logprob, lp.top) for lp in spec.last.logprobs] == \
        [(lp.token, lp.logprob, lp.top) for lp in plain.last.logprobs]
    # EOS: the chat answer ends with the model's end token, in both
    chat = smollm.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    a = Generator(smollm, temperature=0, max_new_tokens=64).generate(chat)
    s = SpeculativeGenerator(smollm, "lookup", temperature=0, max_new_tokens=64)
    assert s.generate(chat) == a and s.last.finish_reason == "eos"


def test_multi_turn_rollback_reset_and_streaming(smollm, self_draft):
    kw = dict(temperature=0, max_new_tokens=16, ignore_eos=True)
    plain, spec = Generator(smollm, **kw), SpeculativeGenerator(smollm, self_draft, spec_k=4, **kw)
    turns = [smollm.tokenize(PROMPTS[1]), smollm.tokenize(" And then", add_special_tokens=False)]
    for turn in turns:
        assert spec.generate(turn) == plain.generate(turn)
    plain.rollback(10)
    spec.rollback(10)
    assert spec.tokens == plain.tokens
    assert list(spec.generate_iter(max_new_tokens=12)) == plain.generate(max_new_tokens=12)
    plain.reset()
    spec.reset()
    assert spec.generate(turns[0]) == plain.generate(turns[0]) and spec.n_cached == plain.n_cached


def test_friendly_api_and_cli_names(smollm):
    prompt = PROMPTS[0]
    assert smollm.generate(prompt, 24, temperature=0, draft="lookup", spec_k=8) == smollm.generate(prompt, 24, temperature=0)
    with pytest.raises(tokenmill.InvalidArgumentError, match="spec_k need draft"):
        smollm.generate(prompt, 4, spec_k=3)
    from tokenmill.tools.cli import build_parser

    args = build_parser().parse_args(["generate", "--prompt", "x", "--lookup", "--spec-k", "6", "--spec-adaptive"])
    assert args.lookup and args.spec_k == 6 and args.spec_adaptive


def test_adaptive_k_grows_on_accepted_drafts_and_low_acceptance_falls_back(smollm, tiny_pair):
    ids = smollm.tokenize("one two three four five six seven eight nine ten " * 6 + "one two")
    spec = SpeculativeGenerator(smollm, "lookup", temperature=0, max_new_tokens=48, ignore_eos=True, spec_k=2,
                                spec_k_adaptive=True, spec_k_max=12)
    out = spec.generate(ids)
    stats = spec.last.speculative
    assert out == Generator(smollm, temperature=0, max_new_tokens=48, ignore_eos=True).generate(ids)
    assert max(stats.k_per_step) > 2 and stats.acceptance_rate > 0.7, stats
    assert spec.acceptance_rate == stats.acceptance_rate
    # a draft that is rarely right: below the threshold the generator decodes plainly for a while
    target, draft = tiny_pair
    bad = SpeculativeGenerator(target, draft, temperature=0, max_new_tokens=80, ignore_eos=True, spec_k=4,
                               spec_disable_below_accept=0.9, spec_probe_interval=20)
    assert bad.generate([1, 2, 3]) == Generator(target, temperature=0, max_new_tokens=80, ignore_eos=True).generate([1, 2, 3])
    assert bad.last.speculative.plain_tokens >= 20
    assert bad.last.speculative.accepted <= bad.last.speculative.proposed


def test_draft_vocabulary_is_checked(smollm, tiny_pair):
    with pytest.raises(tokenmill.InvalidArgumentError, match="vocabulary"):
        SpeculativeGenerator(smollm, tiny_pair[0])
    with pytest.raises(tokenmill.InvalidArgumentError, match="'lookup'"):
        SpeculativeGenerator(smollm, "lokup")
    with pytest.raises(tokenmill.InvalidArgumentError, match="fixed"):
        SpeculativeGenerator(smollm, "lookup").generate("x", spec_k=3)


# ---- sampling: the distribution of plain sampling

SETTINGS = [
    ("model", dict(temperature=0.7, top_k=20)),
    ("model", dict(temperature=1.0, top_p=0.8, repetition_penalty=1.3)),
    ("model", dict(temperature=0.9, min_p=0.1, spec_extra_token=False)),
    ("lookup", dict(temperature=0.8, top_k=30)),
]


def _draws(gen, prompt, n):
    """n generations of 3 tokens from the same prompt (rolled back each time: the prompt's cache is
    reused, the sampler's generator runs on)."""
    gen.prefill(prompt)
    out = []
    for _ in range(n):
        out.append(gen.generate(max_new_tokens=3))
        gen.rollback(len(out[-1]))
    return np.array([o + [-1] * (3 - len(o)) for o in out])


def _homogeneous(a: np.ndarray, b: np.ndarray) -> float:
    """p-value of a chi-square test that two samples of categories come from one distribution (rare
    categories lumped so every expected count is at least 5)."""
    cats, counts = np.unique(np.concatenate([a, b]), return_counts=True)
    keep = cats[counts >= 10]
    table = np.array([[np.sum(x == c) for c in keep] + [np.sum(~np.isin(x, keep))] for x in (a, b)])
    table = table[:, table.sum(axis=0) > 0]
    return float(chi2_contingency(table)[1])


@pytest.mark.parametrize("drafter,settings", SETTINGS, ids=[f"{d}-{i}" for i, (d, _) in enumerate(SETTINGS)])
def test_sampling_distribution_equals_plain_sampling(tiny_pair, drafter, settings):
    target = tiny_pair[0]
    draft_model = tokenmill.load(target.path, weights="q4_0")   # close to the target, not equal: both paths run
    settings = dict(settings)
    spec_only = {k: settings.pop(k) for k in list(settings) if k.startswith("spec_")}
    prompt = [3, 99, 250, 7]
    if drafter == "lookup":   # a prompt that repeats what the target likes to say, so lookup finds it
        likely = Generator(target, temperature=0, max_new_tokens=6, ignore_eos=True).generate(prompt)
        prompt = prompt + likely + prompt + likely[:2]
    n = 1500
    plain = _draws(Generator(target, seed=1, **settings), prompt, n)
    spec_gen = SpeculativeGenerator(target, "lookup" if drafter == "lookup" else draft_model, seed=2, spec_k=2,
                                    spec_lookup_first=False, lookup_ngram_min=1, **settings, **spec_only)
    spec = _draws(spec_gen, prompt, n)
    assert spec_gen.proposed_total > n / 2   # drafts were really proposed and judged
    assert 0 < spec_gen.accepted_total < spec_gen.proposed_total   # both accepted and rejected ones
    for position in range(3):
        p = _homogeneous(plain[:, position], spec[:, position])
        assert p > 1e-3, f"position {position}: p = {p}"
    pairs = lambda x: x[:, 1] * 1000 + x[:, 2]   # noqa: E731 -- the joint of the 2nd and 3rd tokens
    assert _homogeneous(pairs(plain), pairs(spec)) > 1e-3


def test_k_policy_maximises_tokens_per_second():
    from tokenmill.generation.config import SpeculativeOptions
    from tokenmill.generation.speculative import KPolicy

    def policy(alpha, fixed, per_row, draft=0.0):
        p = KPolicy(SpeculativeOptions(k_max=16))
        for rows in (1, 1, 3, 5, 9, 1):
            p.observe_pass(rows, fixed + per_row * rows)
        for _ in range(KPolicy.WARMUP_STEPS):
            p.observe_step(10, round(10 * alpha), draft * 10, 10)
        # the steps' trials estimate (hits + 1 miss) would be 1 - 1 / (10 alpha + 1): alpha as a long run's
        p.trials = 1 / KPolicy.TRIAL_DECAY
        p.hits, p.alpha = alpha * p.trials, alpha
        return p

    assert policy(0.9, 0.004, 0.001).choose(16) == 7      # cheap rows, good drafts: long drafts (the optimum)
    assert policy(0.9, 0.004, 0.004).choose(16) in (1, 2, 3, 4)   # rows as dear as the pass: short ones
    assert policy(0.1, 0.004, 0.004).choose(16) == 0      # poor drafts: plain decoding
    assert policy(0.9, 0.004, 0.001, draft=0.004).choose(16) == 0   # a draft as slow as the target
    assert policy(0.9, 0.004, 0.001).choose(3) <= 3       # never beyond the room left
    fresh = KPolicy(SpeculativeOptions())
    assert fresh.choose(16) == KPolicy.PROBE_K and not fresh.has_plain_cost()
    # a step whose drafting time is all a prefill (timed = 0) says nothing of the cost per draft token
    p = policy(0.9, 0.004, 0.001)
    p.observe_step(2, 2, 0.0, 0)
    assert p.draft_cost == 0.0 and p.choose(16) >= 7   # the all-accepted step raised alpha a little
    # alpha counts the drafts verified: a step of 4 proposed, 1 accepted is one hit and one miss (the
    # two after the miss were never checked), after the prior of 0.5 over two trials; not 1.0 after a
    # first hit
    p = KPolicy(SpeculativeOptions())
    p.observe_step(4, 1, 0.0, 4)
    keep = 1 - KPolicy.TRIAL_DECAY
    assert p.alpha == pytest.approx(((1.0 * keep + 1) * keep) / ((2.0 * keep + 1) * keep + 1))
    p = KPolicy(SpeculativeOptions())
    p.observe_trial(True)
    assert p.alpha == pytest.approx((1.0 * keep + 1) / (2.0 * keep + 1))


def test_k_policy_costs_follow_the_measured_rows():
    """A pass's cost by its rows is what was measured (medians), linear in between and, beyond the
    largest, at the slope of a line through all of them -- not one line: SmolLM2's second exact row
    costs 0.78 of a step and its fifth to ninth 0.55, and a line made k = 1 look as if it paid."""
    from tokenmill.generation.config import SpeculativeOptions
    from tokenmill.generation.speculative import KPolicy

    p = KPolicy(SpeculativeOptions(k_max=16))
    assert p.pass_costs(4) is None
    for rows, seconds in ((1, 5.0), (1, 5.2), (1, 9.0), (2, 9.0), (3, 13.0), (5, 19.0)):
        p.observe_pass(rows, seconds)
    costs = p.pass_costs(7)
    assert costs[1:6] == pytest.approx([5.2, 9.0, 13.0, 16.0, 19.0])
    slope = np.polyfit([1, 2, 3, 5], [5.2, 9.0, 13.0, 19.0], 1)[0]
    assert costs[7] == pytest.approx(19.0 + 2 * slope)
    p.alpha, p.steps = 0.78, KPolicy.WARMUP_STEPS
    # k = 1 yields 1.78 tokens for 9.0 against 2 plain ones for 10.4: below the 10 % margin
    assert p.choose(1) == 0
    p.alpha = 0.95
    assert p.choose(16) > 1


def test_a_draft_models_prompt_prefill_is_not_taken_for_its_cost_per_token(smollm, default_gguf):
    """The draft model's first step prefills the prompt: timed apart, so the cost per drafted token the
    k policy sees is a decode step's. Before, the prefill counted as two draft tokens' cost, and the
    file's own Q4_1 weights drafting for its f16 copy went to plain decoding for good after three
    warm-up steps. (Whether drafting then pays is the machine's: an f16 pass of three rows costs 1.7x
    a one-row step on one CPU, 2.4x on another, so the test checks the cost the policy measured.)"""
    from tokenmill.generation.speculative import ModelDrafter

    draft = smollm
    drafter = ModelDrafter(draft, tokenmill.GenerateConfig(temperature=0))
    prompt = np.array(draft.tokenize("Write a long story about a lighthouse keeper and the sea."), dtype=np.int32)
    first = drafter.propose(prompt, 3)
    assert first.catch_up_seconds > 0 and first.timed == 2 and len(first.tokens) == 3
    after = drafter.propose(np.concatenate([prompt, np.array(first.tokens[:1], dtype=np.int32)]), 3)
    assert after.catch_up_seconds == 0 and after.timed == 3   # one new token: an ordinary draft step
    plain = tokenmill.Generator(draft, temperature=0, max_new_tokens=17, ignore_eos=True)
    plain.generate(prompt.tolist())
    step = plain.last.decode_seconds / 16   # a decode step of the draft model
    # a plain step (the baseline), then warm-up steps at k = 2, the first one's drafting prefilling the prompt
    gen = SpeculativeGenerator(tokenmill.load(default_gguf, weights="f16"), draft, temperature=0, max_new_tokens=8, ignore_eos=True,
                               spec_k=4, spec_k_adaptive=True, spec_k_max=8)
    gen.generate(prompt.tolist())
    assert gen.last.speculative.steps >= 1 and gen.policy.timed_steps >= 1
    assert 0 < gen.policy.draft_cost < 2 * step, (gen.policy.draft_cost, step)   # with the prefill: 4 or more


def test_lookup_drafts_carry_their_match_length_and_k_follows_it():
    """A lookup draft says how far back its occurrence matches the context, and the policy keeps an
    acceptance per class of match length: after a long match's drafts hit and a short match's miss,
    the same global average gives long drafts to the one and none to the other."""
    from tokenmill.generation.config import SpeculativeOptions
    from tokenmill.generation.speculative import KPolicy, LookupDrafter

    drafter = LookupDrafter(2, 4)
    draft = drafter.propose(np.array([5, 6, 7, 8, 9, 1, 2, 3, 7, 8, 9], np.int32), 3)
    assert draft.tokens == [1, 2, 3] and draft.match == 3   # 6 7 8 9 against 3 7 8 9
    draft = drafter.propose(np.array([1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5], np.int32), 2)
    assert draft.tokens == [6, 1] and draft.match == 5   # the whole earlier 1 2 3 4 5
    p = KPolicy(SpeculativeOptions(k_max=16))
    for rows in (1, 1, 3, 5, 9, 17):
        p.observe_pass(rows, 0.004 + 0.001 * rows)
    for _ in range(KPolicy.WARMUP_STEPS):
        p.observe_step(8, 8, 0.0, 8, match=24)    # long matches: all accepted
        p.observe_step(4, 0, 0.0, 4, match=2)     # short ones: the first draft rejected
    p.alpha = 0.6
    assert p.alpha_for(24) > 0.8 > 0.3 > p.alpha_for(2) and p.alpha_for(0) == 0.6
    assert p.choose(16, match=24) >= 8 and p.choose(16, match=2) == 0
    assert p.choose(16, match=6) == p.choose(16)   # a class never seen: the global average


def test_prompt_lookups_shadow_drafts_end_a_fallback_early(smollm):
    """During a fallback, prompt lookup still proposes a token at each plain step (free) and checks it
    against the token decoded: once the output starts to loop, three hits in a row end the fallback
    instead of the remaining plain tokens. A fixed k makes every decision independent of timing."""
    from tokenmill.tools.spec_bench import grounded_prompts

    ids = smollm.chat_prompt([{"role": "user", "content": dict(grounded_prompts())["repeat"]}])
    plain = Generator(smollm, temperature=0, max_new_tokens=160, ignore_eos=True).generate(ids)
    stats = {}
    for shadow in (True, False):
        spec = SpeculativeGenerator(smollm, "lookup", temperature=0, max_new_tokens=160, ignore_eos=True, spec_k=4,
                                    spec_disable_below_accept=0.5, spec_probe_interval=64)
        if not shadow:
            spec._shadow = None
        assert spec.generate(ids) == plain
        stats[shadow] = spec.last.speculative
    # measured: 15 plain tokens with the shadow (two early resumes), 66 without (a whole fallback)
    assert stats[False].early_resumes == 0 and stats[False].plain_tokens >= 64
    assert stats[True].early_resumes >= 1 and stats[True].plain_tokens <= 32, stats[True]
    assert stats[True].accepted > stats[False].accepted + 20


def test_drafts_that_start_to_hit_late_are_taken_up(smollm):
    """Asked to repeat a passage, SmolLM2 writes a line of its own and then loops on it: prompt lookup
    drafts miss at first, so the policy goes to plain decoding, and hit every token once the loop
    starts. Probes must find the loop and keep drafting while each step beats plain decoding; before,
    the first fallback lasted 128 tokens and the lagging acceptance average sent each successful probe
    back to plain decoding (5 of 128 tokens drafted). The loop starts some 55 tokens in, and the first
    fallback comes 14-23 tokens in, so the first probe may come just before the loop: the second must
    come no later (no backoff after one failed probe)."""
    from tokenmill.tools.spec_bench import grounded_prompts

    ids = smollm.chat_prompt([{"role": "user", "content": dict(grounded_prompts())["repeat"]}])
    plain = Generator(smollm, temperature=0, max_new_tokens=160, ignore_eos=True).generate(ids)
    assert len(set(plain[-90:])) < 40   # the output loops (what this test is about)
    spec = SpeculativeGenerator(smollm, "lookup", temperature=0, max_new_tokens=160, ignore_eos=True, spec_k=8,
                                spec_k_adaptive=True, spec_k_max=16, spec_disable_below_accept=0.3)
    assert spec.generate(ids) == plain
    stats = spec.last.speculative
    assert stats.accepted >= 60 and stats.plain_tokens <= 80, stats


def test_pass_costs_are_kept_per_target_model(smollm, tiny_pair):
    """The costs of the target's passes by rows are the model's (and machine's), not a generation's: a
    generator on a model that has verified before shares its record and skips the warm-up probes; a
    generator on another model starts its own."""
    ids = smollm.tokenize("one two three four one two three four one two three four one two")
    plain = Generator(smollm, temperature=0, max_new_tokens=24, ignore_eos=True).generate(ids)
    first = SpeculativeGenerator(smollm, "lookup", temperature=0, max_new_tokens=24, ignore_eos=True)
    assert first.generate(ids) == plain
    assert len(first.policy.passes) >= 2   # plain steps and at least one verification's row count
    second = SpeculativeGenerator(smollm, "lookup", temperature=0, max_new_tokens=24, ignore_eos=True)
    assert second.policy.passes is first.policy.passes and second.policy.warmup_steps == 0
    assert second.generate(ids) == plain
    other = SpeculativeGenerator(tiny_pair[0], "lookup", max_new_tokens=4)
    assert other.policy.passes is not first.policy.passes
    # a record of fewer than two row counts: the probes measure the costs first
    assert KPolicy(first.spec, {1: [0.01]}).warmup_steps == KPolicy.WARMUP_STEPS
