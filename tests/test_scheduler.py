"""The Scheduler: paged KV pool, continuous batching, prefix caching, n > 1, bounded memory, streams
from threads and asyncio, cancellation; and structured output (JSON schemas, regexes) validated by
jsonschema on sampled outputs."""

import asyncio
import json
import re
import threading

import jsonschema
import numpy as np
import pytest

import tokenmill
from tokenmill import GenerateConfig, Generator, Scheduler, SchedulerConfig

SYSTEM = "You are a helpful assistant. Answer briefly and precisely, in one sentence. " * 4


def _prompts(model, n):
    return [model.chat_prompt([{"role": "system", "content": SYSTEM},
                               {"role": "user", "content": f"Question {i}: name a colour and a number."}]) for i in range(n)]


GREEDY = GenerateConfig(temperature=0, max_new_tokens=16, ignore_eos=True)


def test_paged_cache_computes_what_a_contiguous_one_does(smollm):
    ids = smollm.tokenize("The quick brown fox jumps over the lazy dog. " * 10)[:90]
    for kind in ("fp32", "q8"):
        spec = tokenmill.CacheSpec(kind, kind)
        pool = smollm.new_pool(32, 16, spec)
        paged, flat = smollm.new_paged_cache(pool, 256), smollm.new_cache(256, spec)
        a = [smollm.eval(paged, ids[:37], "all").logits] + [smollm.eval(paged, [t]).logits for t in ids[37:60]]
        b = [smollm.eval(flat, ids[:37], "all").logits] + [smollm.eval(flat, [t]).logits for t in ids[37:60]]
        np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
        assert len(paged.block_table) == 4 and pool.free_blocks == 28
        # a second cache adopts the first two blocks; writing into a shared block copies it first
        other = smollm.new_paged_cache(pool, 256)
        other.adopt(paged.block_table[:2], 32)
        assert [pool.refcount(b) for b in paged.block_table[:2]] == [2, 2]
        other.truncate(20)
        tail = smollm.eval(other, ids[20:40], "all").logits
        again = smollm.new_cache(256, spec)          # the same calls on a contiguous cache
        smollm.eval(again, ids[:37])
        again.truncate(20)
        np.testing.assert_array_equal(tail, smollm.eval(again, ids[20:40], "all").logits)
        assert other.block_table[0] == paged.block_table[0] and other.block_table[1] != paged.block_table[1]
        del paged, other
        assert pool.free_blocks == 32


def test_full_pool_is_a_typed_error(smollm):
    pool = smollm.new_pool(2, 16)
    cache = smollm.new_paged_cache(pool, 256)
    with pytest.raises(tokenmill.KVPoolFullError, match="no free block"):
        smollm.eval(cache, list(range(1, 40)), logits=None)
    assert cache.n_past == 0 and pool.free_blocks == 2


def test_greedy_output_is_the_same_alone_or_among_63_others(smollm):
    prompts = _prompts(smollm, 64)
    sched = Scheduler(smollm, max_batch_tokens=96, kv_budget_mb=256).start()   # prompts go in chunks
    try:
        alone = sched.submit(prompts[5], GREEDY)[0].wait()
        together = [r.wait() for r in [sched.submit(p, GREEDY)[0] for p in prompts]]
    finally:
        sched.close()
    assert together[5].token_ids == alone.token_ids
    assert alone.token_ids == Generator(smollm, GREEDY).generate(prompts[5])   # and what Generator gives
    assert all(r.completion_tokens == 16 for r in together)
    assert sched.stats["prefix_tokens"] > 0   # the shared system prompt was reused


def test_prefix_cache_reuses_a_prompt_and_n_shares_it(smollm):
    prompt = _prompts(smollm, 1)[0]
    cached = Scheduler(smollm, kv_budget_mb=64)
    first = cached.submit(prompt, GREEDY)[0]
    cached.run_until_done()
    rows_before = cached.stats["prompt_rows"]
    again = cached.submit(prompt, GREEDY)[0]
    cached.run_until_done()
    assert cached.stats["prompt_rows"] - rows_before < 16          # only the tail of the prompt recomputed
    assert again.wait().token_ids == first.wait().token_ids
    cold = Scheduler(smollm, kv_budget_mb=64, prefix_cache=False)
    reference = cold.submit(prompt, GREEDY)[0]
    cold.run_until_done()
    assert reference.wait().token_ids == again.wait().token_ids
    # n = 3: one prompt pass, three samplers (seed + i)
    group = cold.submit(prompt, GenerateConfig(temperature=1.0, max_new_tokens=12, seed=7), n=3)
    rows = cold.stats["prompt_rows"]
    cold.run_until_done()
    assert cold.stats["prompt_rows"] - rows == len(prompt)
    outs = [r.wait().token_ids for r in group]
    assert len({tuple(o) for o in outs}) > 1
    assert cold.pool.free_blocks == cold.pool.n_blocks   # every block came back, shared ones too
    single = Scheduler(smollm, kv_budget_mb=64)
    alone = single.submit(prompt, GenerateConfig(temperature=1.0, max_new_tokens=12, seed=8))[0]
    single.run_until_done()
    assert alone.wait().token_ids == outs[1]   # the second completion samples with seed 7 + 1
    for s in (cached, cold, single):
        s.close()


def test_a_prefix_that_ends_inside_a_block_is_reused_to_its_last_token(smollm):
    """Two prompts that share 37 tokens (two whole blocks of 16 and 5 tokens of the third): the
    second adopts the first's third block for those 5 positions (copied before it writes its own
    tokens there) and computes only the rest, with the output of a cold run."""
    head = smollm.tokenize(SYSTEM)[:37]
    first = head + smollm.tokenize(" Tell me about owls: their habits, what they eat and where they spend the winter.")
    second = head + smollm.tokenize(" What do cats eat?")
    assert len(first) >= 48 and first[37] != second[37]   # the first fills its third block; they part at 37
    sched = Scheduler(smollm, kv_budget_mb=64, block_size=16)
    a = sched.submit(first, GREEDY)[0]
    sched.run_until_done()
    rows_before = sched.stats["prompt_rows"]
    b = sched.submit(second, GREEDY)[0]
    sched.run_until_done()
    assert sched.stats["prefix_tokens"] == 37
    assert sched.stats["prompt_rows"] - rows_before == len(second) - 37
    cold = Scheduler(smollm, kv_budget_mb=64, prefix_cache=False)
    reference = [cold.submit(p, GREEDY)[0] for p in (first, second)]
    cold.run_until_done()
    assert [a.wait().token_ids, b.wait().token_ids] == [r.wait().token_ids for r in reference]
    assert a.wait().token_ids != b.wait().token_ids   # the prompts did go on differently
    sched.close()
    cold.close()
    assert sched.pool.free_blocks == sched.pool.n_blocks - len(sched.prefix.entries)


def test_requests_arriving_together_share_the_prompt_prefix_in_flight(smollm):
    prompts = _prompts(smollm, 12)
    sched = Scheduler(smollm, kv_budget_mb=128, max_batch_tokens=64)   # the first prompt takes several chunks
    requests = [sched.submit(p, GREEDY)[0] for p in prompts]
    sched.run_until_done()
    common = len(SYSTEM) // 8   # far fewer tokens than the system prompt has
    assert sched.stats["prefix_waits"] >= 11 and sched.stats["prefix_tokens"] >= 11 * common
    assert sched.stats["prompt_rows"] < sum(map(len, prompts)) - 11 * common
    cold = Scheduler(smollm, kv_budget_mb=128, prefix_cache=False)
    reference = [cold.submit(p, GREEDY)[0] for p in prompts]
    cold.run_until_done()
    assert [r.wait().token_ids for r in requests] == [r.wait().token_ids for r in reference]
    sched.close()
    cold.close()


def test_memory_stays_within_the_pool_and_every_request_completes(smollm):
    prompts = _prompts(smollm, 12)
    config = GenerateConfig(temperature=0, max_new_tokens=40, ignore_eos=True)
    per_token = smollm.kv_bytes_per_token("fp32")
    budget_mb = 3.2 * (len(prompts[0]) + 40) * per_token / 2**20   # about three requests at a time
    sched = Scheduler(smollm, kv_budget_mb=budget_mb, prefix_cache=False)
    requests = [sched.submit(p, config)[0] for p in prompts]
    peak = 0
    while any(not r.done for r in requests):
        sched.step()
        peak = max(peak, sched.running)
        assert sched.pool.free_blocks >= 0
    assert 1 < peak <= 3
    results = [r.wait() for r in requests]
    assert all(r.completion_tokens == 40 for r in results)
    assert results[3].token_ids == Generator(smollm, config).generate(prompts[3])
    with pytest.raises(tokenmill.KVPoolFullError, match="pool has"):
        _run(sched, sched.submit(prompts[0], GenerateConfig(max_new_tokens=4000))[0])
    sched.close()


def _run(sched, request):
    sched.run_until_done()
    return request.wait()


def test_streams_threads_asyncio_and_cancel(smollm):
    sched = Scheduler(smollm, kv_budget_mb=128).start()
    try:
        req = sched.submit("Once upon a time", GenerateConfig(temperature=0, max_new_tokens=200, ignore_eos=True))[0]
        seen = []
        for token, piece in req.events():
            seen.append(token)
            if len(seen) == 5:
                req.cancel()
        result = req.wait()
        assert result.finish_reason == "cancelled" and 5 <= result.completion_tokens < 200
        # afterwards the scheduler serves as before, from many threads at once
        outs = {}

        def client(i):
            outs[i] = sched.submit(f"Story {i}:", GREEDY)[0].wait().token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(len(o) == 16 for o in outs.values())

        async def main():
            req = (await sched.asubmit("The capital of France is", GenerateConfig(temperature=0, max_new_tokens=8)))[0]
            return "".join([piece async for _, piece in req.aevents()]), req.wait()

        text, res = asyncio.run(main())
        assert text == res.text and "Paris" in text
    finally:
        sched.close()
    with pytest.raises(tokenmill.TokenmillError, match="closed"):
        sched.submit("x", GREEDY)


def test_scheduler_arguments_are_checked(smollm):
    with pytest.raises(tokenmill.InvalidArgumentError, match="max_batch_tokens"):
        Scheduler(smollm, max_batch_tokens=0)
    with pytest.raises(tokenmill.InvalidArgumentError, match="kv_budget_mb"):
        SchedulerConfig(kv_budget_mb=-1)
    sched = Scheduler(smollm, kv_budget_mb=8)
    with pytest.raises(tokenmill.InvalidArgumentError, match="n must be"):
        sched.submit("x", n=0)
    with pytest.raises(tokenmill.InvalidArgumentError, match="auto"):
        sched.submit("x", cache_kind="auto")
    with pytest.raises(tokenmill.InvalidArgumentError, match="empty"):
        sched.submit([])
    sched.close()


# ---- structured output

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                                      "likes_tea": {"type": "boolean"}}, "required": ["name", "age", "likes_tea"]},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
     "required": ["colour", "tags"]},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "enum-array", "int-list"])
def test_sampled_json_always_validates(smollm, schema):
    prompt = smollm.chat_prompt([{"role": "user", "content": "Answer in JSON: " + json.dumps(schema)}])
    sched = Scheduler(smollm, kv_budget_mb=256)
    requests = sched.submit(prompt, GenerateConfig(temperature=1.0, max_new_tokens=80, seed=11, json_schema=schema), n=100)
    sched.run_until_done()
    sched.close()
    results = [r.wait() for r in requests]
    assert len({r.text for r in results}) > 10   # really sampled
    # a finished document always validates; one cut by max_new_tokens (an endless number, say) is
    # reported as "length", as OpenAI does, and must be rare
    finished = [r for r in results if r.finish_reason == "eos"]
    assert len(finished) >= 90
    assert all(r.finish_reason == "length" and r.completion_tokens == 80 for r in results if r.finish_reason != "eos")
    for r in finished:
        jsonschema.validate(json.loads(r.text), schema)


def test_regex_and_json_through_generate(smollm):
    out = smollm.generate("My code is", 20, temperature=1.0, seed=3, regex=r"[0-9]{3}-[a-z]{4}")
    assert re.fullmatch(r"[0-9]{3}-[a-z]{4}", out)
    obj = json.loads(smollm.generate("A user:", 60, temperature=0.7, seed=1, json_schema=SCHEMAS[0]))
    jsonschema.validate(obj, SCHEMAS[0])
    with pytest.raises(tokenmill.InvalidArgumentError, match="not both"):
        smollm.generate("x", 4, json_schema={}, regex="a")
    with pytest.raises(tokenmill.InvalidArgumentError, match="JSON object"):
        smollm.generate("x", 4, json_schema="[1]")
