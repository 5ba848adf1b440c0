"""`tokenmill bench --serve`: a load benchmark of OpenAI-compatible servers on loopback (a benchmark,
never a test). Each server runs as its own process on the same GGUF with the same threads and KV type
(fp16 by default, both servers' own default): tokenmill's (`tokenmill serve`) and llama-cpp-python's
(`python -m llama_cpp.server`). For 1, 4, 16, 64
concurrent streaming chat clients (tokenmill-int8: `tokenmill serve --int8`, activations rounded to
int8 for 4-bit weights as llama.cpp does), every client sends its requests one after another: a shared
system prompt of about 150 tokens plus a user turn of its own (about 200 prompt tokens in all), and
exactly N new tokens (the end-of-sequence tokens biased to -100, as both servers honour logit_bias).

Reported per level: total generated tok/s (all tokens / wall time of the level), time to first token
and inter-token latency p50 / p99, peak RSS of the server process during the level, and whether every
response arrived complete (finish_reason "length" with N tokens). Then the prefix cache: TTFT of a
request whose 150-token system prompt is cached, against the same request with a fresh system prompt."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

SYSTEM = ("You are Mill, a patient assistant for a small public library. You answer questions about opening "
          "hours, borrowing rules, the catalogue, events for children and adults, printing and the reading "
          "rooms. Keep answers short and friendly, say when you are not sure, never invent a book that is not "
          "in the catalogue, and suggest asking a librarian at the front desk for anything about fines, lost "
          "cards or personal accounts. When a question is about a book, give its title, author and shelf "
          "mark if you know them, and mention whether an audio or large-print edition exists. The library "
          "opens at nine and closes at six on weekdays, at one on Saturdays, and stays closed on Sundays.")

TOPICS = ["the history of printing", "how volcanoes form", "the rules of chess", "growing tomatoes",
          "the water cycle", "why the sky is blue", "learning to swim", "the first computers",
          "how bees make honey", "the moons of Jupiter", "baking bread", "the Roman roads"]


def user_turn(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    return (f"Visitor {i} here. I am writing a school project about {topic} and I would like a long, "
            f"detailed explanation of {topic}, with examples, that I can read before I come in to borrow books.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class ServerProcess:
    """A server subprocess on a free loopback port, its RSS sampled while a level runs."""

    def __init__(self, name: str, argv: list[str], port: int, model_id: Optional[str]):
        self.name, self.argv, self.port, self.model_id = name, argv, port, model_id
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-bench-{name}-{port}.log", "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self._peak, self._sampling = 0.0, False

    def wait_ready(self, timeout: float = 180) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited (log: {self.log.name})")
            try:
                r = httpx.get(self.url + "/v1/models", timeout=2)
                if r.status_code == 200:
                    self.model_id = self.model_id or r.json()["data"][0]["id"]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} server did not start in {timeout} s")

    def sample_rss(self):
        """Context manager: the peak RSS (MB) seen while the body runs, in .peak_mb afterwards."""
        server = self

        class _Sampler:
            def __enter__(self):
                server._peak, server._sampling = _rss_mb(server.proc.pid), True
                self.thread = threading.Thread(target=self._run, daemon=True)
                self.thread.start()
                return self

            def _run(self):
                while server._sampling:
                    server._peak = max(server._peak, _rss_mb(server.proc.pid))
                    time.sleep(0.1)

            def __exit__(self, *exc):
                server._sampling = False
                self.thread.join()
                self.peak_mb = server._peak

        return _Sampler()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@dataclass
class Response:
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    finish: Optional[str] = None
    error: Optional[str] = None


async def stream_chat(client, server: ServerProcess, system: str, user: str, new_tokens: int,
                      no_eos: dict) -> Response:
    body = {"model": server.model_id, "stream": True, "max_tokens": new_tokens, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "logit_bias": no_eos}
    out, t0, last = Response(), time.perf_counter(), None
    try:
        async with client.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        now = time.perf_counter()
                        if last is None:
                            out.ttft = now - t0
                        else:
                            out.gaps.append(now - last)
                        last = now
                        out.tokens += 1
                    if choice.get("finish_reason"):
                        out.finish = choice["finish_reason"]
    except Exception as exc:   # a lost request is a result of the benchmark, not its end
        out.error = f"{type(exc).__name__}: {exc}"
    return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def run_level(server: ServerProcess, clients: int, requests_per_client: int, new_tokens: int,
                    no_eos: dict) -> tuple[list[Response], float]:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        async def one_client(c: int) -> list[Response]:
            return [await stream_chat(client, server, SYSTEM, user_turn(c * requests_per_client + k), new_tokens, no_eos)
                    for k in range(requests_per_client)]

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(c) for c in range(clients)))
        return [r for rs in per_client for r in rs], time.perf_counter() - t0


async def prefix_ttft(server: ServerProcess, repeats: int, no_eos: dict) -> tuple[float, float]:
    """Median TTFT of a request with a fresh system prompt (cold) and of one whose system prompt was
    just served (cached); one token each, one client."""
    import httpx

    cold, warm = [], []
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        for i in range(repeats):
            system = f"Session {i * 7919 + 13}. " + SYSTEM   # a prefix no earlier request had
            cold.append((await stream_chat(client, server, system, user_turn(100 + i), 2, no_eos)).ttft)
            warm.append((await stream_chat(client, server, system, user_turn(200 + i), 2, no_eos)).ttft)
    return statistics.median(cold), statistics.median(warm)


def start_server(engine: str, model_path: Path, threads: int, kv_budget_mb: float, n_ctx: int,
                 cache_kind: str = "fp16") -> ServerProcess:
    """A server on a free loopback port, its KV cache stored as cache_kind (fp32, fp16, bf16, q8, q4)."""
    from .peers import _LLAMA_KV_TYPES

    if cache_kind not in _LLAMA_KV_TYPES:
        raise ValueError(f"cache_kind must be one of {', '.join(_LLAMA_KV_TYPES)}, got {cache_kind!r}")
    port = _free_port()
    if engine in ("tokenmill", "tokenmill-int8"):
        argv = [sys.executable, "-m", "tokenmill", "serve", "--model", str(model_path), "--port", str(port),
                "--threads", str(threads), "--kv-budget-mb", str(kv_budget_mb), "--model-name", "bench",
                "--cache-kind", cache_kind]
        return ServerProcess(engine, argv + ["--int8"] * (engine == "tokenmill-int8"), port, "bench")
    if engine == "llama-cpp-python":
        kv_type = str(_LLAMA_KV_TYPES[cache_kind])
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--port", str(port),
                "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx),
                "--model_alias", "bench", "--type_k", kv_type, "--type_v", kv_type]
        return ServerProcess(engine, argv, port, "bench")
    raise ValueError(f"unknown engine {engine!r} (tokenmill, tokenmill-int8, llama-cpp-python)")


def run(model: Optional[str] = None, *, threads: int = 2, clients: tuple[int, ...] = (1, 4, 16, 64),
        new_tokens: int = 128, requests_per_client: int = 1, engines=("tokenmill", "tokenmill-int8", "llama-cpp-python"),
        kv_budget_mb: float = 256.0, prefix_repeats: int = 5, cache_kind: str = "fp16") -> list[dict]:
    from ..api import load
    from ..engine.default_model import resolve_default

    path = Path(model) if model else resolve_default()
    probe = load(path)
    system_tokens = len(probe.tokenize(SYSTEM))
    prompt_tokens = len(probe.chat_prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_turn(0)}]))
    no_eos = {str(t): -100 for t in sorted(set(probe.eos_ids))}
    del probe
    print(f"model {path.name}: system prompt {system_tokens} tokens, prompts ~{prompt_tokens} tokens, "
          f"{new_tokens} new tokens, {threads} threads", flush=True)
    rows = []
    for engine in engines:
        server = start_server(engine, path, threads, kv_budget_mb, n_ctx=max(2048, 2 * (prompt_tokens + new_tokens)),
                              cache_kind=cache_kind)
        try:
            server.wait_ready()
            asyncio.run(run_level(server, 1, 1, 8, no_eos))   # warm-up
            for c in clients:
                with server.sample_rss() as rss:
                    responses, wall = asyncio.run(run_level(server, c, requests_per_client, new_tokens, no_eos))
                complete = sum(1 for r in responses if r.error is None and r.finish == "length" and r.tokens == new_tokens)
                gaps = [g for r in responses for g in r.gaps]
                ttfts = [r.ttft for r in responses if r.error is None]
                rows.append({
                    "engine": engine, "clients": c, "requests": len(responses),
                    "complete": f"{complete}/{len(responses)}",
                    "tok/s": round(sum(r.tokens for r in responses) / wall, 1),
                    "ttft_p50_ms": round(1e3 * _pct(ttfts, 0.5), 1), "ttft_p99_ms": round(1e3 * _pct(ttfts, 0.99), 1),
                    "itl_p50_ms": round(1e3 * _pct(gaps, 0.5), 2), "itl_p99_ms": round(1e3 * _pct(gaps, 0.99), 2),
                    "peak_rss_mb": round(rss.peak_mb),
                })
                errors = {r.error for r in responses if r.error}
                print(rows[-1], *(f"\n  error: {e}" for e in list(errors)[:3]), flush=True)
            cold, warm = asyncio.run(prefix_ttft(server, prefix_repeats, no_eos))
            rows.append({"engine": engine, "clients": "prefix", "ttft_cold_ms": round(1e3 * cold, 1),
                         "ttft_cached_ms": round(1e3 * warm, 1), "speedup": round(cold / warm, 2)})
            print(rows[-1], flush=True)
        finally:
            server.close()
    return rows
