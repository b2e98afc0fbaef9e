"""OpenAI request parsing and response shapes, as vLLM's OpenAI server does them.

Validation follows vLLM: pydantic models that ignore unknown fields, 400 with type
`BadRequestError` for a malformed body, 404 `NotFoundError` for an unknown model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .tokenizer import render_chat, token_ids_as_tokens, tokenize


class ApiError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(self, message: str, status: int = 400, err_type: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type
        self.param = param

    def body(self) -> bytes:
        return error_body(self.message, self.err_type, self.status, self.param)


def error_body(message: str, err_type: str, code: int, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    )


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


# --- request models (unknown fields ignored, like vLLM) -----------------------------------
class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ChatMessage(_Lenient):
    role: str
    content: str | list[dict[str, Any] | str] | None = None


class _Common(_Lenient):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    ignore_eos: bool | None = False
    priority: int = 0  # vLLM's: lower is served first (--scheduling-policy priority)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False


PromptType = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Common):
    prompt: PromptType
    echo: bool | None = False


class EmbeddingRequest(_Lenient):
    model: str | None = None
    input: PromptType
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


@dataclass(slots=True)
class Generation:
    """What the engine needs from a chat or completion request."""

    kind: Literal["chat", "completion"]
    model: str | None
    tokens: list[str]
    max_tokens: int | None
    stream: bool
    include_usage: bool
    priority: int = 0


def _validate(cls: type[_Lenient], body: Any) -> Any:
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.")
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        raise ApiError(_describe(exc)) from None


def _single_n(req: _Common) -> None:
    if req.n not in (None, 1):
        raise ApiError("The simulated engine supports n=1 only.", param="n")


def parse_chat(body: Any) -> Generation:
    req: ChatRequest = _validate(ChatRequest, body)
    _single_n(req)
    messages = [m.model_dump() for m in req.messages]
    text = render_chat(messages, req.add_generation_prompt, req.continue_final_message)
    max_tokens = req.max_completion_tokens or req.max_tokens
    opts = req.stream_options
    return Generation(
        "chat", req.model, tokenize(text), max_tokens, bool(req.stream),
        bool(opts and opts.include_usage), req.priority,
    )


def prompt_tokens(prompt: PromptType, what: str = "prompt") -> list[str]:
    """A completion prompt: a string, token ids, or a batch of exactly one of those."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(
                f"The simulated engine takes one {what} per request, not a batch of "
                f"{len(prompt)}.", param=what)
        prompt = prompt[0]  # type: ignore[assignment]
    if isinstance(prompt, str):
        tokens = tokenize(prompt)
    else:
        tokens = token_ids_as_tokens(prompt)  # type: ignore[arg-type]
    if not tokens:
        raise ApiError(f"The {what} must not be empty.", param=what)
    return tokens


def parse_completion(body: Any) -> Generation:
    req: CompletionRequest = _validate(CompletionRequest, body)
    _single_n(req)
    opts = req.stream_options
    return Generation(
        "completion", req.model, prompt_tokens(req.prompt), req.max_tokens, bool(req.stream),
        bool(opts and opts.include_usage), req.priority,
    )


def parse_any_prompt(body: Any) -> list[str]:
    """Prompt tokens of a chat or completion body (for /debug/cached_tokens, /tokenize)."""
    if isinstance(body, dict) and "messages" in body:
        return parse_chat(body).tokens
    if isinstance(body, dict) and "prompt" in body:
        return parse_completion(body).tokens
    raise ApiError("The body needs `messages` (chat) or `prompt` (completion).")


def parse_embedding(body: Any) -> tuple[str | None, list[list[str]], str, int | None]:
    req: EmbeddingRequest = _validate(EmbeddingRequest, body)
    inputs: list[Any]
    if isinstance(req.input, list) and req.input and isinstance(req.input[0], (str, list)):
        inputs = list(req.input)
    else:
        inputs = [req.input]
    out: list[list[str]] = []
    for item in inputs:
        tokens = tokenize(item) if isinstance(item, str) else token_ids_as_tokens(item)
        if not tokens:
            raise ApiError("The input must not be empty.", param="input")
        out.append(tokens)
    return req.model, out, req.encoding_format, req.dimensions


# --- responses ------------------------------------------------------------------------
def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": max(cached, 0)},
    }


def now_s() -> int:
    return int(time.time())


def full_response(
    gen: Generation, req_id: str, model: str, text: str, finish_reason: str,
    prompt: int, completion: int, cached: int,
) -> dict[str, Any]:
    created = now_s()
    if gen.kind == "chat":
        return {
            "id": req_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "reasoning_content": None,
                            "tool_calls": []},
                "logprobs": None, "finish_reason": finish_reason, "stop_reason": None,
            }],
            "usage": usage(prompt, completion, cached),
            "prompt_logprobs": None,
        }
    return {
        "id": req_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{
            "index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
            "stop_reason": None, "prompt_logprobs": None,
        }],
        "usage": usage(prompt, completion, cached),
    }


class ChunkWriter:
    """SSE chunks of one streamed response. The JSON around a token is built once per
    request, so each token costs one small orjson call and a bytes join."""

    __slots__ = ("_created", "_head", "_id", "_kind", "_mid", "_model", "_tail")

    def __init__(self, kind: str, req_id: str, model: str) -> None:
        self._kind = kind
        self._id = req_id
        self._model = model
        self._created = now_s()
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        head = orjson.dumps({"id": req_id, "object": obj, "created": self._created,
                             "model": model})[:-1]
        if kind == "chat":
            self._head = b"data: " + head + b',"choices":[{"index":0,"delta":{"content":'
            self._mid = b'},"logprobs":null,"finish_reason":'
        else:
            self._head = b"data: " + head + b',"choices":[{"index":0,"text":'
            self._mid = b',"logprobs":null,"finish_reason":'
        self._tail = b',"stop_reason":null}]}\n\n'

    def role(self) -> bytes:
        """vLLM's first chat chunk: the assistant role with empty content."""
        return b"data: " + orjson.dumps({
            "id": self._id, "object": "chat.completion.chunk", "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}],
        }) + b"\n\n"

    def token(self, text: str, finish_reason: str | None = None) -> bytes:
        reason = b"null" if finish_reason is None else orjson.dumps(finish_reason)
        return self._head + orjson.dumps(text) + self._mid + reason + self._tail

    def usage(self, prompt: int, completion: int, cached: int,
              timing: dict[str, float] | None = None) -> bytes:
        obj = "chat.completion.chunk" if self._kind == "chat" else "text_completion"
        chunk: dict[str, Any] = {
            "id": self._id, "object": obj, "created": self._created, "model": self._model,
            "choices": [], "usage": usage(prompt, completion, cached),
        }
        if timing is not None:  # --report-engine-ttft: not in vLLM's answers
            chunk["x_sim_timing"] = timing
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    @staticmethod
    def done() -> bytes:
        return b"data: [DONE]\n\n"
