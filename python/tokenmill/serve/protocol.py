"""The OpenAI wire format: request models (checked by pydantic, unknown fields ignored as OpenAI-compatible
servers do), their translation into a GenerateConfig, and the response objects (whole and streamed)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..generation import GenerateConfig, GenerationResult

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop",
                  "error": "stop"}

# max_tokens when a request gives none (and the context allows it)
DEFAULT_MAX_TOKENS = 512


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    # tokenmill's extras (as extra body fields)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False   # as vLLM: generate max_tokens whatever the model says (load tests)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: Optional[dict[str, Any]] = None


class ChatRequest(_Request):
    messages: list[dict[str, Any]]
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: Optional[str] = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, Any]]] = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    tokens: list[int]


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with their content as text (a list of text parts is joined; other parts refused)."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", "messages")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}]: only text content parts are supported", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({**m, "content": content})
    if not out:
        raise ApiError(400, "messages must not be empty", "messages")
    return out


def generate_config(req: _Request, prompt_tokens: int, n_ctx: int, n_vocab: int, *, max_tokens: Optional[int],
                    logprobs: Optional[int], json_schema=None) -> GenerateConfig:
    room = n_ctx - prompt_tokens
    if room < 1:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens; the context holds {n_ctx}", "messages",
                       "context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"max_tokens={max_tokens} does not fit: the prompt has {prompt_tokens} tokens of a "
                            f"{n_ctx}-token context", "max_tokens", "context_length_exceeded")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop takes up to 4 non-empty strings", "stop")
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < n_vocab:
            raise ApiError(400, f"logit_bias key {key!r} is not a token id of this model", "logit_bias")
        if not -100.0 <= value <= 100.0:
            raise ApiError(400, "logit_bias values must be in [-100, 100]", "logit_bias")
        bias[int(key)] = float("-inf") if value <= -100.0 else float(value)
    return GenerateConfig(
        max_new_tokens=max_tokens or min(DEFAULT_MAX_TOKENS, room), temperature=req.temperature, top_p=req.top_p,
        top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        logit_bias=bias or None, seed=req.seed, stop=stops or None, logprobs=logprobs, json_schema=json_schema,
        max_seq_len=n_ctx, ignore_eos=req.ignore_eos,
    )


def response_schema(fmt: Optional[ResponseFormat]):
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    schema = (fmt.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object", "response_format")
    return schema


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, results: list[GenerationResult]) -> dict:
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode_unchecked([token])


def chat_logprob_entries(tokenizer, logprobs) -> list[dict]:
    """OpenAI's chat logprobs `content` entries for a list of TokenLogprob."""
    content = []
    for lp in logprobs:
        text = _token_text(tokenizer, lp.token)
        content.append({
            "token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": (t := _token_text(tokenizer, tid)), "logprob": v, "bytes": list(t.encode("utf-8"))}
                             for tid, v in lp.top],
        })
    return content


def chat_logprobs(tokenizer, result: GenerationResult) -> Optional[dict]:
    return None if result.logprobs is None else {"content": chat_logprob_entries(tokenizer, result.logprobs)}


def completion_logprob_fields(tokenizer, logprobs, offset: int = 0) -> dict:
    """The completions API's logprobs object for a list of TokenLogprob whose text starts at `offset`
    of the choice's text."""
    tokens, offsets = [], []
    for lp in logprobs:
        text = _token_text(tokenizer, lp.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{_token_text(tokenizer, t): v for t, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def completion_logprobs(tokenizer, result: GenerationResult) -> Optional[dict]:
    return None if result.logprobs is None else completion_logprob_fields(tokenizer, result.logprobs)


def chat_response(rid: str, model: str, prompt_tokens: int, results: list[GenerationResult], tokenizer) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                     "logprobs": chat_logprobs(tokenizer, r), "finish_reason": FINISH_REASONS[r.finish_reason]}
                    for i, r in enumerate(results)],
        "usage": usage(prompt_tokens, results),
    }


def completion_response(rid: str, model: str, prompt_tokens: int, results: list[GenerationResult], tokenizer,
                        base: int = 0) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": base + i, "text": r.text, "logprobs": completion_logprobs(tokenizer, r),
                     "finish_reason": FINISH_REASONS[r.finish_reason]} for i, r in enumerate(results)],
        "usage": usage(prompt_tokens, results),
    }


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish: Optional[str] = None,
               logprobs: Optional[dict] = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                         "finish_reason": FINISH_REASONS[finish] if finish else None}]}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, finish: Optional[str] = None,
                     logprobs: Optional[dict] = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs,
                         "finish_reason": FINISH_REASONS[finish] if finish else None}]}
