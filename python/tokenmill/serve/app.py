"""The OpenAI-compatible HTTP server (FastAPI on uvicorn; `pip install "tokenmill[server]"`): one model,
one Scheduler serving every client at once, streams as server-sent events.

    tokenmill serve --model PATH [--host 127.0.0.1] [--port 8000] [--api-key K] [--cors-origin URL]
                    [--kv-budget-mb MB] [--max-batch-tokens N] [--max-queue N] [--max-body-bytes N]

Endpoints: /v1/chat/completions, /v1/completions, /v1/models, /v1/embeddings (mean-pooled final hidden
states, L2-normalised), /tokenize, /detokenize, /health, /metrics (Prometheus text). Errors come as
OpenAI error objects with 400 / 401 / 404 / 413 / 422 / 503, never as a traceback."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Optional, Sequence

import numpy as np

from ..errors import ContextOverflowError, InvalidArgumentError, KVPoolFullError, TokenmillError
from ..generation import Scheduler, SchedulerConfig
from . import protocol as P


class _Metrics:
    """Prometheus metrics of one server (a registry of its own, so several apps can live in one process)."""

    def __init__(self, scheduler: Scheduler):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tokenmill_requests", "HTTP requests served", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("tokenmill_prompt_tokens", "Prompt tokens of completed requests", registry=r)
        self.generated = Counter("tokenmill_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("tokenmill_time_to_first_token_seconds", "Time to the first generated token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("tokenmill_inter_token_latency_seconds", "Time between generated tokens", registry=r,
                             buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2))
        Gauge("tokenmill_queue_depth", "Requests waiting for admission", registry=r).set_function(
            lambda: scheduler.queue_depth)
        Gauge("tokenmill_running_sequences", "Sequences in the running batch", registry=r).set_function(
            lambda: scheduler.running)
        pool = scheduler.pool
        Gauge("tokenmill_kv_pool_blocks", "Blocks of the KV pool", registry=r).set(pool.n_blocks)
        Gauge("tokenmill_kv_pool_used_blocks", "KV pool blocks in use or cached", registry=r).set_function(
            lambda: pool.n_blocks - pool.free_blocks)
        Gauge("tokenmill_prefix_cached_tokens", "Prompt tokens served from the prefix cache so far", registry=r).set_function(
            lambda: scheduler.stats["prefix_tokens"])

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _BodyLimit:
    """ASGI middleware: a request body over max_bytes is answered with 413 before it reaches a route."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, P.ApiError(413, f"the request body exceeds {self.max_bytes} bytes",
                                                      code="request_too_large"))
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _send_error(send, P.ApiError(413, f"the request body exceeds {self.max_bytes} bytes",
                                               code="request_too_large"))


class _TooLarge(Exception):
    pass


class _ApiKey:
    """ASGI middleware: requests without the bearer key get 401 (but /health, /metrics and CORS
    preflights). Plain ASGI rather than Starlette's @app.middleware("http"), which passes every chunk
    of a streamed response through a task and a memory stream of its own."""

    OPEN_PATHS = ("/health", "/metrics")

    def __init__(self, app, api_key: str, rejected: Callable[[P.ApiError, str], None]):
        self.app, self.expected, self.rejected = app, f"Bearer {api_key}".encode(), rejected

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.OPEN_PATHS and scope["method"] != "OPTIONS":
            if dict(scope.get("headers") or []).get(b"authorization") != self.expected:
                err = P.ApiError(401, "invalid or missing API key", code="invalid_api_key")
                self.rejected(err, scope["path"])
                return await _send_error(send, err)
        await self.app(scope, receive, send)


async def _send_error(send, err: P.ApiError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _api_error(exc: Exception) -> P.ApiError:
    if isinstance(exc, P.ApiError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return P.ApiError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, KVPoolFullError):
        return P.ApiError(503, str(exc), code="kv_pool_full", kind="server_error")
    if isinstance(exc, (InvalidArgumentError, TokenmillError, ValueError)):
        return P.ApiError(400, str(exc))
    return P.ApiError(500, "internal error", kind="server_error")


def create_app(model, *, model_name: Optional[str] = None, scheduler_config: Optional[SchedulerConfig] = None,
               api_key: Optional[str] = None, cors_origins: Sequence[str] = (), max_body_bytes: int = 4 << 20,
               max_queue: int = 1024):
    """The FastAPI app serving `model` (a tokenmill.Model with a tokenizer)."""
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if model.tokenizer is None:
        raise InvalidArgumentError("the server needs a model with a tokenizer")
    name = model_name or f"tokenmill/{model.path.rsplit('/', 1)[-1]}"
    scheduler = Scheduler(model, scheduler_config)
    metrics = _Metrics(scheduler)
    state = {"closing": False}

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:   # graceful shutdown: no new work, running streams end (cancelled) with their final chunks
            state["closing"] = True
            await asyncio.get_running_loop().run_in_executor(None, scheduler.close)

    app = FastAPI(title="tokenmill", lifespan=lifespan)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    app.state.scheduler = scheduler

    def error_response(err: P.ApiError, endpoint: str) -> JSONResponse:
        metrics.requests.labels(endpoint, str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(P.ApiError)
    async def _api(request: HttpRequest, exc: P.ApiError):
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HttpRequest, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(P.ApiError(422, f"invalid request: {first.get('msg', 'malformed body')}", param), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: HttpRequest, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(P.ApiError(exc.status_code, str(exc.detail), kind=kind), request.url.path)

    @app.exception_handler(Exception)
    async def _other(request: HttpRequest, exc: Exception):
        return error_response(_api_error(exc), request.url.path)

    if api_key:
        app.add_middleware(_ApiKey, api_key=api_key,
                           rejected=lambda err, path: metrics.requests.labels(path, str(err.status)).inc())

    def check_model(requested: str) -> Optional[str]:
        """The adapter a request's `model` names: None for the base model, else a loaded adapter's name
        (served as a model of its own, as vLLM serves LoRA adapters)."""
        if requested == name:
            return None
        if requested in model.adapters:
            return requested
        served = ", ".join([name, *model.adapters])
        raise P.ApiError(404, f"the model '{requested}' does not exist; this server has {served}", "model",
                         "model_not_found", kind="not_found")

    def model_card(model_id: str) -> dict:
        card = {"id": model_id, "object": "model", "created": 0, "owned_by": "tokenmill"}
        if model_id != name:
            card["parent"] = name
        return card

    def admit() -> None:
        if state["closing"]:
            raise P.ApiError(503, "the server is shutting down", kind="server_error")
        if scheduler.queue_depth >= max_queue:
            raise P.ApiError(503, "the server is overloaded; try again later", code="overloaded", kind="server_error")

    async def submit(ids: list[int], config, n: int):
        try:
            return await scheduler.asubmit(ids, config, n)
        except Exception as exc:
            raise _api_error(exc) from exc

    async def watch(req) -> AsyncIterator[tuple[Optional[int], str]]:
        """A request's events with TTFT and inter-token latencies recorded."""
        t0, last = time.perf_counter(), None
        async for ev in req.aevents():
            now = time.perf_counter()
            if ev[0] is not None:
                if last is None:
                    metrics.ttft.observe(now - t0)
                else:
                    metrics.itl.observe(now - last)
                last = now
                metrics.generated.inc()
            yield ev

    async def results(reqs) -> list:
        async def one(req):
            async for _ in watch(req):
                pass
            return req.wait(0)
        try:
            return list(await asyncio.gather(*(one(r) for r in reqs)))
        except asyncio.CancelledError:
            for r in reqs:
                r.cancel()
            raise
        except Exception as exc:
            raise _api_error(exc) from exc

    def sse(payload: Any) -> bytes:
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    async def stream(reqs, make_chunk, usage_of, endpoint: str):
        """Server-sent events of n requests interleaved as their tokens come, then [DONE]. With logprobs
        asked for, a chunk carries the entries of the tokens whose text it brings (a token with no text
        of its own yet -- part of a character, or held for a stop string -- rides with the next one)."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i, req):
            try:
                n_tokens = 0
                async for tok, piece in watch(req):
                    lp = None
                    if tok is not None:
                        if n_tokens < len(req.token_logprobs):
                            lp = req.token_logprobs[n_tokens]
                        n_tokens += 1
                    await merged.put((i, piece, lp, None))
                res = req.wait(0)
                await merged.put((i, None, None, res))
            except Exception as exc:   # a request that failed ends its choice
                await merged.put((i, None, None, exc))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
        finished, results_ = 0, [None] * len(reqs)
        pending: list[list] = [[] for _ in reqs]   # per choice: logprob entries not sent yet
        try:
            for i in range(len(reqs)):
                first = make_chunk(i, None, None, start=True)
                if first is not None:
                    yield sse(first)
            while finished < len(reqs):
                i, piece, lp, end = await merged.get()
                if lp is not None:
                    pending[i].append(lp)
                if end is None:
                    if piece:
                        yield sse(make_chunk(i, piece, None, logprobs=pending[i] or None))
                        pending[i] = []
                    continue
                finished += 1
                if isinstance(end, Exception):
                    err = _api_error(end)
                    yield sse(err.body())
                    continue
                results_[i] = end
                yield sse(make_chunk(i, None, end.finish_reason, logprobs=pending[i] or None))
            done = [r for r in results_ if r is not None]
            if usage_of is not None:
                yield sse(usage_of(done))
            yield b"data: [DONE]\n\n"
            metrics.requests.labels(endpoint, "200").inc()
        finally:   # the client went away (or the stream ended): nothing keeps generating for it
            for r in reqs:
                if not r.done:
                    r.cancel()
            for t in tasks:
                t.cancel()

    @app.get("/health")
    async def health():
        if state["closing"]:
            raise P.ApiError(503, "the server is shutting down", kind="server_error")
        return {"status": "ok", "model": name, "running": scheduler.running, "queue_depth": scheduler.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(m) for m in [name, *model.adapters]]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str):
        check_model(model_id)
        return model_card(model_id)

    @app.post("/v1/chat/completions")
    async def chat(body: P.ChatRequest):
        adapter = check_model(body.model)
        admit()
        messages = P.chat_messages(body.messages)
        try:
            ids = model.chat_prompt(messages)
        except Exception as exc:
            raise _api_error(exc) from exc
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        config = P.generate_config(body, len(ids), model.n_ctx, model.n_vocab,
                                   max_tokens=body.max_completion_tokens or body.max_tokens, logprobs=logprobs,
                                   json_schema=P.response_schema(body.response_format)).replace(adapter=adapter)
        rid, created = P.new_id("chatcmpl"), int(time.time())
        reqs = await submit(ids, config, body.n)
        metrics.prompt_tokens.inc(len(ids))
        if not body.stream:
            res = await results(reqs)
            metrics.requests.labels("/v1/chat/completions", "200").inc()
            return P.chat_response(rid, body.model, len(ids), res, model.tokenizer)

        def chunk(i, piece, finish, start=False, logprobs=None):
            if start:
                return P.chat_chunk(rid, body.model, created, i, {"role": "assistant", "content": ""})
            lp = {"content": P.chat_logprob_entries(model.tokenizer, logprobs)} if logprobs else None
            return P.chat_chunk(rid, body.model, created, i, {"content": piece} if finish is None else {}, finish, lp)

        usage_of = (lambda done: {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                                  "choices": [], "usage": P.usage(len(ids), done)}) if body.include_usage() else None
        return StreamingResponse(stream(reqs, chunk, usage_of, "/v1/chat/completions"), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest):
        adapter = check_model(body.model)
        admit()
        if body.echo or body.suffix:
            raise P.ApiError(400, "echo and suffix are not supported", "echo" if body.echo else "suffix")
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise P.ApiError(400, "prompt must not be empty", "prompt")
        if body.stream and len(prompts) > 1:
            raise P.ApiError(400, "streaming takes one prompt", "prompt")
        rid, created = P.new_id("cmpl"), int(time.time())
        all_reqs, lengths = [], []
        for p in prompts:
            try:
                ids = model.tokenize(p) if isinstance(p, str) else model.check_ids(p, "prompt")
            except Exception as exc:
                raise _api_error(exc) from exc
            if not ids:
                raise P.ApiError(400, "prompt must not be empty", "prompt")
            config = P.generate_config(body, len(ids), model.n_ctx, model.n_vocab, max_tokens=body.max_tokens or 16,
                                       logprobs=body.logprobs).replace(adapter=adapter)
            all_reqs.append(await submit(ids, config, body.n))
            lengths.append(len(ids))
            metrics.prompt_tokens.inc(len(ids))
        if not body.stream:
            choices, used = [], []
            for reqs in all_reqs:
                res = await results(reqs)
                used += res
                choices += P.completion_response(rid, body.model, 0, res, model.tokenizer, base=len(choices))["choices"]
            metrics.requests.labels("/v1/completions", "200").inc()
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model, "choices": choices,
                    "usage": P.usage(sum(lengths) * body.n, used)}
        reqs = all_reqs[0]

        text_offset = [0] * len(reqs)   # per choice: where the next chunk's text starts

        def chunk(i, piece, finish, start=False, logprobs=None):
            if start:
                return None
            lp = P.completion_logprob_fields(model.tokenizer, logprobs, text_offset[i]) if logprobs else None
            text_offset[i] += len(piece or "")
            return P.completion_chunk(rid, body.model, created, i, piece or "", finish, lp)

        usage_of = (lambda done: {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                                  "choices": [], "usage": P.usage(lengths[0], done)}) if body.include_usage() else None
        return StreamingResponse(stream(reqs, chunk, usage_of, "/v1/completions"), media_type="text/event-stream")

    @app.post("/v1/embeddings")
    async def embeddings(body: P.EmbeddingRequest):
        adapter = check_model(body.model)
        admit()
        inputs = body.input
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not inputs:
            raise P.ApiError(400, "input must not be empty", "input")
        try:
            token_lists = [model.tokenize(x) if isinstance(x, str) else model.check_ids(x, "input") for x in inputs]
        except Exception as exc:
            raise _api_error(exc) from exc
        if any(not t or len(t) > model.n_ctx for t in token_lists):
            raise P.ApiError(400, f"every input needs 1 to {model.n_ctx} tokens", "input")

        def embed():   # mean of the final hidden states, unit length
            out = []
            for ids in token_lists:
                hidden = model.eval(model.new_cache(len(ids)), ids, logits=None, hidden="all", adapter=adapter).hidden
                v = hidden.mean(axis=0)
                v = (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)
                # base64: the float32 bytes, little-endian, as the OpenAI client asks by default
                out.append(base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                           else v.tolist())
            return out

        vectors = await asyncio.get_running_loop().run_in_executor(None, embed)
        n_tokens = sum(len(t) for t in token_lists)
        metrics.requests.labels("/v1/embeddings", "200").inc()
        return {"object": "list", "model": body.model,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    @app.post("/tokenize")
    async def tokenize(body: P.TokenizeRequest):
        if (body.prompt is None) == (body.messages is None):
            raise P.ApiError(400, "give prompt or messages", "prompt")
        try:
            ids = model.chat_prompt(P.chat_messages(body.messages)) if body.messages is not None else \
                model.tokenize(body.prompt, body.add_special_tokens)
        except Exception as exc:
            raise _api_error(exc) from exc
        return {"tokens": ids, "count": len(ids), "max_model_len": model.n_ctx}

    @app.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest):
        try:
            return {"text": model.detokenize(body.tokens)}
        except Exception as exc:
            raise _api_error(exc) from exc

    return app


def serve(model, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    """Runs the server until interrupted (SIGINT / SIGTERM shut it down gracefully)."""
    import uvicorn

    uvicorn.run(create_app(model, **kwargs), host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
