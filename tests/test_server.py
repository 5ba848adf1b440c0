"""The OpenAI-compatible server, run for real (uvicorn on a local port) and driven by the `openai`
client and raw httpx: answers equal the library's, streams end in [DONE], n > 1, logprobs equal to
the model's own log-softmax, schema-constrained output, errors as OpenAI error objects, API keys,
clients that hang up mid-stream, metrics, embeddings, tokenize."""

import base64
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx  # test extras (with fastapi, openai, uvicorn): a missing one must fail, not skip
import jsonschema
import numpy as np
import openai
import pytest
import uvicorn


from tokenmill import GenerateConfig, Generator
from tokenmill.serve import create_app

NAME = "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class _Server:
    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(smollm):
    srv = _Server(create_app(smollm, model_name=NAME, max_body_bytes=64 << 10))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _greedy(smollm, messages, n):
    return Generator(smollm, GenerateConfig(temperature=0, max_new_tokens=n)).generate(smollm.chat_prompt(messages))


def test_chat_equals_the_library_and_streams_the_same_text(smollm, client):
    expected = _greedy(smollm, QUESTION, 24)
    out = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=24, temperature=0)
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == smollm.detokenize(expected)
    assert out.usage.prompt_tokens == len(smollm.chat_prompt(QUESTION))
    assert out.usage.completion_tokens == len(expected)
    assert choice.finish_reason == ("length" if len(expected) == 24 else "stop")
    chunks = list(client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected)


def test_raw_sse_ends_with_done(server):
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for p in payloads if p["choices"][0]["text"]) >= 1


def test_completions_many_prompts_n_and_seeds(smollm, client):
    out = client.completions.create(model=NAME, prompt=["The sky is", "Water is"], max_tokens=6, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    for c, p in zip(out.choices, ["The sky is", "Water is"]):
        ids = Generator(smollm, GenerateConfig(temperature=0, max_new_tokens=6)).generate(p)
        assert c.text == smollm.detokenize(ids)
    sampled = dict(model=NAME, messages=QUESTION, max_tokens=12, temperature=1.0, seed=5, n=3)
    a, b = client.chat.completions.create(**sampled), client.chat.completions.create(**sampled)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert texts == [c.message.content for c in b.choices]   # a seed reproduces, across the batch
    assert 3 <= a.usage.completion_tokens <= 36 and a.usage.prompt_tokens == len(smollm.chat_prompt(QUESTION))


def test_logprobs_are_the_models_log_softmax(smollm, client):
    out = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=3, temperature=0,
                                         logprobs=True, top_logprobs=3)
    first = out.choices[0].logprobs.content[0]
    logits = smollm.eval(smollm.new_cache(64), smollm.chat_prompt(QUESTION)).logits[-1].astype(np.float64)
    logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    best = int(np.argmax(logp))
    assert first.token == smollm.detokenize([best])
    assert abs(first.logprob - logp[best]) < 1e-3
    top = np.argsort(-logp)[:3]
    assert [t.token for t in first.top_logprobs] == [smollm.detokenize([int(i)]) for i in top]
    assert np.allclose([t.logprob for t in first.top_logprobs], logp[top], atol=1e-3)


def test_streamed_logprobs_are_the_unstreamed_ones(client, server):
    """stream=True with logprobs: the chunks' entries, in order, are exactly the non-streamed answer's
    (one per generated token, text and values), for chat and for completions."""
    ask = dict(model=NAME, messages=QUESTION, max_tokens=20, temperature=0, logprobs=True, top_logprobs=2)
    answer = client.chat.completions.create(**ask)
    whole = answer.choices[0].logprobs.content
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(whole) == answer.usage.completion_tokens > 3
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole]
    assert "".join(e.token for e in streamed) == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "logprobs": 2}
    want = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        parts = [json.loads(line[6:])["choices"][0]["logprobs"] for line in r.iter_lines()
                 if line.startswith("data: {")]
    parts = [p for p in parts if p]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for p in parts for v in p[key]] == want[key], key
    assert len(want["tokens"]) == 10


def test_json_schema_response_format_validates(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"]}
    out = client.chat.completions.create(
        model=NAME, messages=QUESTION, max_tokens=60, temperature=0.8, seed=2, n=4,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    for c in out.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), schema)
    anything = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=40, temperature=0,
                                              response_format={"type": "json_object"})
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    else:
        assert anything.choices[0].message.content.lstrip().startswith("{")


def test_errors_are_openai_error_objects(smollm, client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=NAME, messages=QUESTION, temperature=7)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt="word " * (smollm.n_ctx + 10), max_tokens=4)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt=[smollm.n_vocab + 5], max_tokens=4)
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (100 << 10), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"


def test_api_key_is_required_when_set(smollm):
    srv = _Server(create_app(smollm, model_name=NAME, api_key="s3cret"))
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in ok.models.list()] == [NAME]
        assert httpx.get(srv.url + "/health").status_code == 200   # health stays open for probes
        refused = httpx.post(srv.url + "/v1/chat/completions", json={"model": NAME, "messages": QUESTION})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert 'endpoint="/v1/chat/completions",status="401"' in httpx.get(srv.url + "/metrics").text
        pieces = [c.choices[0].delta.content or "" for c in ok.chat.completions.create(
            model=NAME, messages=QUESTION, max_tokens=8, temperature=0, stream=True) if c.choices]
        assert "".join(pieces)   # a stream passes the key check whole
    finally:
        srv.close()


def test_a_client_hanging_up_mid_stream_frees_its_sequence(server, client):
    scheduler = server.app.state.scheduler
    # 3000 tokens take over 20 s even alone; a busy machine once let 400 finish before the hang-up arrived
    body = {"model": NAME, "messages": QUESTION, "max_tokens": 3000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break
    deadline = time.time() + 20
    while scheduler.running and time.time() < deadline:
        time.sleep(0.05)
    assert scheduler.running == 0 and scheduler.stats["cancelled"] >= 1
    assert scheduler.pool.free_blocks + scheduler.prefix.evictable() == scheduler.pool.n_blocks
    out = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=4, temperature=0)
    assert out.choices[0].message.content


def test_concurrent_clients_get_their_sequential_answers(smollm, client):
    prompts = [[{"role": "user", "content": f"Count from {i} to {i + 5}."}] for i in range(6)]
    expected = [smollm.detokenize(_greedy(smollm, p, 20)) for p in prompts]

    def ask(messages):
        return client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, prompts))
    assert [a.choices[0].message.content for a in answers] == expected


def test_models_health_metrics_embeddings_tokenize(smollm, client, server):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok"
    metrics = httpx.get(server.url + "/metrics").text
    assert "tokenmill_generated_tokens_total" in metrics and "tokenmill_kv_pool_blocks" in metrics
    vectors = client.embeddings.create(model=NAME, input=["a cat", "a dog"])   # the client asks for base64
    floats = httpx.post(server.url + "/v1/embeddings", json={"model": NAME, "input": "a cat"}).json()
    a = np.array(vectors.data[0].embedding)
    assert np.isclose(np.linalg.norm(a), 1, atol=1e-5) and np.allclose(a, floats["data"][0]["embedding"], atol=1e-6)
    raw = httpx.post(server.url + "/v1/embeddings",
                     json={"model": NAME, "input": "a cat", "encoding_format": "base64"}).json()["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(raw), "<f4"), a, atol=1e-6)
    tok = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert tok["tokens"] == smollm.tokenize("Hello world") and tok["count"] == len(tok["tokens"])
    assert httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}).json()["text"] == "Hello world"


def _smollm_adapter(directory, r=4, seed=0):
    """A random PEFT adapter for SmolLM2's shapes (q/v projections of every layer)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(30):
        for proj, n_out in (("q_proj", 576), ("v_proj", 192)):
            p = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[p + ".lora_A.weight"] = (rng.standard_normal((r, 576)) * 0.2).astype(np.float32)
            tensors[p + ".lora_B.weight"] = (rng.standard_normal((n_out, r)) * 0.2).astype(np.float32)
    directory.mkdir()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"]}))
    return directory


def test_adapters_are_served_as_models(default_gguf, tmp_path):
    import tokenmill

    model = tokenmill.load(default_gguf)
    model.load_adapter(_smollm_adapter(tmp_path / "style"), name="style")
    srv = _Server(create_app(model, model_name=NAME))
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in c.models.list()] == [NAME, "style"]
        prompt = model.chat_prompt(QUESTION)
        cfg = GenerateConfig(temperature=0, max_new_tokens=16)
        want = {None: model.detokenize(Generator(model, cfg).generate(prompt)),
                "style": model.detokenize(Generator(model, cfg, adapter="style").generate(prompt))}
        assert want[None] != want["style"]
        for served, adapter in ((NAME, None), ("style", "style")):
            out = c.chat.completions.create(model=served, messages=QUESTION, max_tokens=16, temperature=0)
            assert out.model == served and out.choices[0].message.content == want[adapter]
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="other", messages=QUESTION, max_tokens=2)
    finally:
        srv.close()


def test_serve_bench_passes_the_cache_kind_on_and_checks_it(default_gguf):
    """`tokenmill bench --serve --cache-kind` reaches both servers' KV settings; a kind neither has is
    refused before any server starts."""
    from tokenmill.tools import serve_bench

    with pytest.raises(ValueError, match="cache_kind"):
        serve_bench.start_server("tokenmill", default_gguf, 2, 64.0, 2048, cache_kind="q3")
    server = serve_bench.start_server("tokenmill", default_gguf, 2, 64.0, 2048, cache_kind="fp16")
    try:
        assert server.argv[server.argv.index("--cache-kind") + 1] == "fp16"
        server.wait_ready(timeout=120)   # the server took the flag and serves
    finally:
        server.close()


def test_serve_stores_kv_as_fp16_unless_told():
    """`tokenmill serve` pools K and V as fp16 by default (llama-server's choice), fp32 on request; the
    Scheduler class keeps fp32, the Generator's numbers."""
    from tokenmill.tools.cli import build_parser
    from tokenmill.generation import SchedulerConfig

    assert build_parser().parse_args(["serve", "--model", "m.gguf"]).cache_kind == "fp16"
    assert build_parser().parse_args(["serve", "--model", "m.gguf", "--cache-kind", "fp32"]).cache_kind == "fp32"
    assert SchedulerConfig().cache_kind == "fp32"
