"""Generator / GenerateConfig: cache reuse across calls, stepping, rollback, stop rules, context
overflow policies, logprobs, batches and threads."""

import threading

import numpy as np
import pytest

import tokenmill
from tokenmill import GenerateConfig, Generator

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tokenmill.load(tiny_models["llama"][0])


def greedy_reference(model, context, n, window=None):
    """Greedy tokens computed from full recomputation (no cache reuse), optionally on the last
    `window` tokens only."""
    context = list(context)
    out = []
    for _ in range(n):
        seen = context[-window:] if window else context
        token = int(np.argmax(model.logits(seen)[-1]))
        out.append(token)
        context.append(token)
    return out


def test_second_call_continues_the_cached_context(smollm):
    gen = Generator(smollm, GenerateConfig(max_new_tokens=12, ignore_eos=True, **GREEDY))
    turn1 = smollm.tokenize("The sun is a star. The moon is")
    out1 = gen.generate(turn1)
    turn2 = smollm.tokenize(" Also, the Earth is", add_special_tokens=False)
    out2 = gen.generate(turn2)
    assert gen.last.prompt_tokens == len(turn2)   # only the new tokens were evaluated
    assert gen.tokens == turn1 + out1 + turn2 + out2
    fresh = Generator(smollm, GenerateConfig(max_new_tokens=12, ignore_eos=True, **GREEDY))
    assert fresh.generate(turn1 + out1 + turn2) == out2


def test_prefill_decode_step_rollback_reset(tiny):
    ids = list(range(10, 30))
    gen = Generator(tiny, GenerateConfig(**GREEDY))
    gen.prefill(ids)
    assert gen.n_cached == len(ids)
    steps = [gen.decode_step() for _ in range(6)]
    assert steps == greedy_reference(tiny, ids, 6)
    gen.rollback(3)
    assert gen.tokens == ids + steps[:3]
    assert [gen.decode_step() for _ in range(3)] == steps[3:]
    gen.reset()
    assert gen.tokens == [] and gen.n_cached == 0
    with pytest.raises(ValueError, match="prefill"):
        gen.decode_step()
    with pytest.raises(ValueError):
        gen.rollback(1)


def test_generate_iter_equals_generate(smollm):
    cfg = GenerateConfig(max_new_tokens=16, temperature=0.9, seed=5)
    a = list(Generator(smollm, cfg).generate_iter(smollm.tokenize("A list of fruits:")))
    b = Generator(smollm, cfg).generate(smollm.tokenize("A list of fruits:"))
    assert a == b and len(a) > 0


def test_ignore_eos_and_several_eos_ids(smollm):
    prompt = smollm.chat_prompt([{"role": "user", "content": "Say hi."}])
    stopped = Generator(smollm, GenerateConfig(max_new_tokens=60, **GREEDY))
    out = stopped.generate(prompt)
    assert stopped.last.finish_reason == "eos"
    going = Generator(smollm, GenerateConfig(max_new_tokens=len(out) + 5, ignore_eos=True, **GREEDY))
    longer = going.generate(prompt)
    assert longer[: len(out)] == out and longer[len(out)] == 2 and going.last.finish_reason == "length"
    # the first token of the answer, declared an end token among others, ends generation at once
    multi = Generator(smollm, GenerateConfig(max_new_tokens=60, eos_token_id=[out[0], 12345], **GREEDY))
    assert multi.generate(prompt) == [] and multi.last.finish_reason == "eos"


def test_stop_string_across_token_boundaries(smollm):
    cfg = GenerateConfig(max_new_tokens=20, ignore_eos=True, **GREEDY)
    ids = smollm.tokenize("Count: 1, 2, 3,")
    full = Generator(smollm, cfg).generate(ids)
    text = smollm.detokenize(full)
    pieces = [smollm.detokenize([t]) for t in full]
    # a stop string that begins inside one token and ends inside a later one
    start = len(pieces[0]) + len(pieces[1]) - 1
    stop = text[start : start + len(pieces[2]) + 2]
    gen = Generator(smollm, cfg.replace(stop=[stop, "never-seen"]))
    out = gen.generate(ids)
    assert gen.last.finish_reason == "stop"
    assert gen.last.text == text[: text.index(stop)]
    assert out == full[:1]   # whole tokens before the stop string; the straddling ones are dropped
    assert gen.tokens == ids + out   # and rolled back out of the context
    streamed = "".join(tokenmill.Model.generate(smollm, ids, 20, stop=stop, ignore_eos=True, stream=True, **GREEDY))
    assert streamed == gen.last.text


def test_context_overflow_error(tiny):
    gen = Generator(tiny, GenerateConfig(max_seq_len=16, **GREEDY))
    with pytest.raises(tokenmill.ContextOverflowError, match="needs 20 tokens .* max_seq_len is 16"):
        gen.generate(list(range(20)))
    gen = Generator(tiny, GenerateConfig(max_seq_len=16, max_new_tokens=50, **GREEDY))
    out = gen.generate(list(range(10)))
    assert len(out) == 6 and gen.last.finish_reason == "context"


def test_context_overflow_truncate_keeps_the_latest_tokens(tiny):
    prompt = list(range(40, 70))   # 30 tokens
    gen = Generator(tiny, GenerateConfig(max_seq_len=24, max_new_tokens=4, context_overflow="truncate", **GREEDY))
    out = gen.generate(prompt)
    assert gen.tokens[: 20] == prompt[-20:]   # room kept for the 4 new tokens
    assert out == greedy_reference(tiny, prompt[-20:], 4)


def test_context_overflow_slide_keeps_generating(tiny):
    prompt = list(range(5, 15))
    window = 16
    gen = Generator(tiny, GenerateConfig(max_seq_len=window, max_new_tokens=20, context_overflow="slide", **GREEDY))
    out = gen.generate(prompt)
    assert len(out) == 20 and gen.last.finish_reason == "length"
    # the seed's rule: each token is predicted from (at most) the last max_seq_len - 1 tokens
    assert out == greedy_reference(tiny, prompt, 20, window=window - 1)


def test_logprobs_and_details(smollm):
    ids = smollm.tokenize("The capital of France is")
    result = smollm.generate(ids, 5, details=True, logprobs=3, ignore_eos=True, **GREEDY)
    assert isinstance(result, tokenmill.GenerationResult)
    assert result.completion_tokens == 5 and result.prompt_tokens == len(ids)
    assert result.text == smollm.detokenize(result.token_ids, skip_special_tokens=True)
    logits = smollm.logits(ids + result.token_ids)
    for i, lp in enumerate(result.logprobs):
        row = logits[len(ids) - 1 + i].astype(np.float64)
        logp = row - row.max() - np.log(np.exp(row - row.max()).sum())
        assert lp.token == result.token_ids[i]
        assert abs(lp.logprob - logp[lp.token]) < 1e-4
        assert [t for t, _ in lp.top] == list(np.argsort(-logp)[:3])
        assert lp.top[0][0] == lp.token   # greedy picks the most likely
    assert result.prefill_seconds > 0 and result.decode_seconds > 0 and result.decode_tokens_per_second > 0


def test_batch_greedy_equals_sequential(smollm):
    prompts = ["Hello, my name is", "The weather today is very", "1, 2, 3,", "Paris is the capital of"]
    batched = smollm.generate_batch(prompts, 12, ignore_eos=True, **GREEDY)
    sequential = [smollm.generate(p, 12, ignore_eos=True, **GREEDY) for p in prompts]
    assert batched == sequential


def test_batch_per_request_parameters_and_seeds(smollm):
    prompts = ["Once upon a time", "Once upon a time", "In the beginning"]
    results = smollm.generate_batch(prompts, 16, seed=[1, 2, 3], temperature=[0.9, 0.9, 0.0],
                                    details=True, ignore_eos=True)
    alone = [smollm.generate(p, 16, seed=s, temperature=t, details=True, ignore_eos=True)
             for p, s, t in zip(prompts, [1, 2, 3], [0.9, 0.9, 0.0])]
    assert [r.token_ids for r in results] == [r.token_ids for r in alone]
    assert results[0].token_ids != results[1].token_ids
    # finished sequences leave the batch while the others go on
    lengths = smollm.generate_batch(["a", "b", "c"], 16, details=True, ignore_eos=True,
                                    configs=[GenerateConfig(max_new_tokens=n, ignore_eos=True, **GREEDY) for n in (2, 9, 5)])
    assert [r.completion_tokens for r in lengths] == [2, 9, 5]


def test_stateless_generate_and_batch_input(tiny):
    ids = [list(range(3, 12)), list(range(50, 54))]
    batch = tokenmill.generate(tiny, ids, max_new_tokens=5, temperature=0.0)
    assert batch == [greedy_reference(tiny, s, 5) for s in ids]
    assert tokenmill.generate(tiny, ids[0], max_new_tokens=5, temperature=0.0) == batch[0]


def test_two_threads_do_not_interfere(smollm):
    prompts = ["Tell me about cats.", "Tell me about dogs."]
    expected = [smollm.generate(p, 16, seed=11, ignore_eos=True) for p in prompts]
    results = [None, None]

    def run(i):
        results[i] = smollm.generate(prompts[i], 16, seed=11, ignore_eos=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


@pytest.mark.parametrize("bad,name", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.01), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(min_p=-0.1), "min_p"), (dict(min_p=1.1), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(stop=3), "stop"), (dict(context_overflow="wrap"), "context_overflow"),
    (dict(eos_token_id="x"), "eos_token_id"), (dict(max_seq_len=0), "max_seq_len"),
])
def test_config_validation_names_the_parameter(bad, name):
    with pytest.raises(ValueError, match=name):
        GenerateConfig(**bad)


def test_unknown_override_is_a_type_error(tiny):
    with pytest.raises(TypeError, match="temprature"):
        Generator(tiny).generate([1, 2], temprature=1.0)
