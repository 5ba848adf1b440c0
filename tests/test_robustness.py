"""What holds across calls and threads: Ctrl-C stops a long generation (even inside one long forward
pass) and leaves the model usable; loading and dropping a model does not leak; batches allocate the
caches their requests can use, not the whole context; a Generator or a cache used by two threads at
once raises instead of corrupting state; exceptions in pool threads reach the caller; the kernel
level changes only between passes. Process-level measurements run in a fresh interpreter."""

import json
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import tokenmill
from tokenmill import _core, _testing


def _run_script(code: str, timeout: float = 240) -> dict:
    """Runs code in a fresh interpreter; it prints one JSON object last."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ctrl_c_stops_prefill_and_decode_and_the_model_stays_usable(default_gguf):
    r = _run_script(f"""
        import json, os, signal, threading, time
        import tokenmill
        m = tokenmill.load({str(default_gguf)!r})
        expected = m.generate("The capital of France is", max_new_tokens=8, temperature=0, ignore_eos=True)
        def interrupt_after(seconds):
            threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        ids = m.tokenize("The quick brown fox jumps over the lazy dog. " * 500)[:4000]
        out = {{}}
        gen = tokenmill.Generator(m, temperature=0, decode_plan="none")
        interrupt_after(0.4)
        t0 = time.perf_counter()
        try:
            gen.prefill(ids)                      # one 4,000-token forward pass
            out["prefill"] = "not interrupted"
        except KeyboardInterrupt:
            out["prefill"] = time.perf_counter() - t0
        out["cached_after_prefill"] = gen.n_cached
        interrupt_after(0.4)
        t0 = time.perf_counter()
        try:
            m.generate("Once upon a time", max_new_tokens=100000, ignore_eos=True)
            out["decode"] = "not interrupted"
        except KeyboardInterrupt:
            out["decode"] = time.perf_counter() - t0
        out["same_after"] = m.generate("The capital of France is", max_new_tokens=8, temperature=0,
                                       ignore_eos=True) == expected
        gen.reset()
        out["generator_after"] = gen.generate("The capital of France is", max_new_tokens=8, ignore_eos=True)
        out["generator_expected"] = m.tokenize(expected, add_special_tokens=False)
        print(json.dumps(out))
    """)
    assert isinstance(r["prefill"], float) and r["prefill"] < 1.4, r   # signal at 0.4 s, stopped within a second
    assert r["cached_after_prefill"] == 0                                # the interrupted pass changed no cache
    assert isinstance(r["decode"], float) and r["decode"] < 1.4, r
    assert r["same_after"]
    assert r["generator_after"][:4] == r["generator_expected"][:4]


def test_loading_and_dropping_a_model_does_not_leak(default_gguf):
    r = _run_script(f"""
        import ctypes, gc, json
        import numpy as np
        from tokenmill import _core

        def rss_kb():   # live memory: what the allocator keeps cached for reuse is returned first
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4

        def cycle():
            m = _core.Model.from_gguf({str(default_gguf)!r}, 2)
            c = _core.KVCache(m, 256)
            m.forward([c], [np.arange(1, 100)], "all")   # workspace for 99 rows, logits for all
            del c, m
            gc.collect()

        for _ in range(5):
            cycle()
        before = rss_kb()
        for _ in range(50):
            cycle()
        print(json.dumps({{"before": before, "after": rss_kb()}}))
    """)
    assert r["after"] <= r["before"] * 1.05, r


def test_batches_allocate_what_requests_can_use(default_gguf):
    r = _run_script(f"""
        import json
        import tokenmill

        def vm_peak_kb():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmPeak"))

        m = tokenmill.load({str(default_gguf)!r})
        before = vm_peak_kb()
        texts = m.generate_batch(["x " * i for i in range(1, 65)], 4, temperature=0)
        print(json.dumps({{"grew_kb": vm_peak_kb() - before, "n": len(texts),
                          "full_cache_mb": m.kv_cache_bytes(m.n_ctx, tokenmill.CacheSpec()) / 2**20}}))
    """)
    assert r["n"] == 64
    # 64 full-context caches would be 64 x ~360 MB of address space; what the prompts need is ~0.3 GB
    assert r["grew_kb"] < 2 * 2**20, r
    assert r["full_cache_mb"] > 300


def test_generator_refuses_a_second_thread(smollm):
    gen = tokenmill.Generator(smollm, temperature=0, ignore_eos=True)
    errors, done = [], []

    def worker():
        try:
            done.append(gen.generate("Once upon a time there was", max_new_tokens=40))
        except tokenmill.ConcurrentUseError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) + len(errors) == 2 and len(done) >= 1
    expected = len(smollm.tokenize("Once upon a time there was")) + 40 * len(done)
    assert gen.n_cached == expected - 1 and len(gen.tokens) == expected   # consistent, whoever won


def test_a_stream_from_another_thread_is_refused(smollm):
    gen = tokenmill.Generator(smollm, temperature=0, ignore_eos=True)
    stream = gen.generate_iter("Hello", max_new_tokens=20)
    next(stream)
    caught = []
    t = threading.Thread(target=lambda: caught.append(pytest.raises(tokenmill.ConcurrentUseError, gen.generate, "x")))
    t.start()
    t.join()
    assert caught and caught[0].type is tokenmill.ConcurrentUseError
    assert len(list(stream)) == 19 and gen.last.finish_reason == "length"


def test_a_cache_in_use_by_a_forward_pass_refuses_other_calls(smollm):
    cache = smollm.new_cache(2048)
    ids = smollm.tokenize("The quick brown fox jumps over the lazy dog. " * 200)[:1500]
    t = threading.Thread(target=lambda: smollm.eval(cache, ids, logits=None))
    t.start()
    time.sleep(0.2)
    with pytest.raises(tokenmill.InvalidArgumentError, match="in use"):
        cache.truncate(0)
    t.join()
    assert cache.n_past == len(ids)


def test_pool_thread_exceptions_reach_the_caller():
    with pytest.raises(tokenmill.InvalidArgumentError, match="thread 1 of the pool failed"):
        _testing.pool_raise(2, 1)
    with pytest.raises(tokenmill.InvalidArgumentError, match="thread 0 of the pool failed"):
        _testing.pool_raise(2, 0)
    assert _testing.pool_recovers(2) == sum(range(1000))


def test_kernel_level_changes_wait_for_running_passes(smollm):
    levels = _core.cpu_levels()
    if len(levels) < 2:
        pytest.skip("one kernel level on this CPU")
    ids = smollm.tokenize("The quick brown fox jumps over the lazy dog. " * 200)[:1200]
    original = _core.cpu_level()
    t0 = time.perf_counter()
    smollm.eval(smollm.new_cache(2048), ids, logits=None)
    pass_seconds = time.perf_counter() - t0
    t = threading.Thread(target=lambda: smollm.eval(smollm.new_cache(2048), ids, logits=None))
    t.start()
    time.sleep(0.1 * pass_seconds)
    try:
        t0 = time.perf_counter()
        _core.set_cpu_level(levels[0])
        waited = time.perf_counter() - t0
        t.join(timeout=0.5 * pass_seconds)
        assert not t.is_alive()                    # the pass was over when the level changed ...
        assert waited > 0.5 * pass_seconds         # ... because set_cpu_level waited for it
        assert _core.cpu_level() == levels[0]
    finally:
        t.join()
        _core.set_cpu_level(original)


def test_sampling_history_is_read_in_place():
    """The sampler reads an int32 history array without copying it, whatever its length, and only
    checks the window its penalties use."""
    p = _core.SamplerParams()
    p.repetition_penalty = 1.5
    p.temperature = 0.0
    s = _core.Sampler(p, 10)
    logits = np.array([0, 0, 5, 4.9, 0, 0, 0, 0, 0, 0], np.float32)
    history = np.zeros(1_000_000, np.int32)
    history[-1] = 2
    assert s.sample(logits, history) == 3            # the last token is penalised
    history[0] = 99                                   # outside the 64-token window: not read
    assert s.sample(logits, history) == 3
