"""`tunefactory api`: an OpenAI-compatible HTTP server (FastAPI, run by uvicorn) over one ChatEngine.

`/v1/models` (and `/v1/models/{id}`) and `/v1/chat/completions` (streamed as server-sent events, or whole),
with the request fields OpenAI clients send. Errors use OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`, so the official client raises its own exceptions: 400 for a bad request (malformed JSON, a field out
of range, messages the template cannot write, a prompt that fills the model's context), 401 for a wrong API
key, 413 for an oversized body, 429 when the configured number of generations is already running or waiting;
404 and 405 for an unknown route or method.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tasks.inference import ChatEngine, MessageError, ReplyStream


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 1024  # the largest max_tokens a request may ask for (also the default)
    max_request_bytes: int = 1_000_000
    max_concurrency: int = 4  # generations running or queued at once; more are refused with 429
    max_n: int = 8


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionDefinition

    @model_validator(mode="before")
    @classmethod
    def wrapped(cls, value: Any) -> Any:
        """A bare definition ({"name", ...}, as datasets hold them) is taken as OpenAI's wrapped one."""
        if isinstance(value, dict) and "type" not in value and "name" in value:
            return {"type": "function", "function": value}
        return value


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request this server honours; others are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    # OpenAI documents these as "or null": null means the default
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: str | dict[str, Any] | None = None  # "none" is honoured; "auto" and the others act as "auto"
    seed: int | None = None  # sampling: the same request and seed, the same reply
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)  # only 0 (no penalty): refused otherwise
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def stop_words(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else self.stop or []

    @property
    def tool_definitions(self) -> list[dict[str, Any]] | None:
        """The tools the model may call (none under tool_choice "none"), as plain definitions."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def text_of(content: str | list[ContentPart] | None) -> str:
    """A message's text; content parts other than text are refused (this server serves text models)."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type != "text":
            raise ApiError(400, f"content part of type {part.type!r} is not supported; send text", param="messages")
        texts.append(part.text or "")
    return "".join(texts)


def plain_messages(request: ChatRequest) -> list[dict[str, Any]]:
    return [{"role": m.role, "content": text_of(m.content), "tool_calls": m.tool_calls} for m in request.messages]


def parse_request(body: bytes, limits: Limits, model_name: str) -> ChatRequest:
    """The validated request, or the ApiError that says what is wrong with it."""
    if len(body) > limits.max_request_bytes:
        raise ApiError(413, f"request body is {len(body)} bytes; this server accepts at most "
                            f"{limits.max_request_bytes}", code="request_too_large")
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    try:
        request = ChatRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ApiError(400, f"{field}: {first['msg']}", param=field) from None
    asked = request.max_completion_tokens or request.max_tokens
    if asked is not None and asked > limits.max_tokens:
        raise ApiError(400, f"max_tokens {asked} is more than this server's limit of {limits.max_tokens}",
                       param="max_tokens")
    if request.choices > limits.max_n:
        raise ApiError(400, f"n {request.n} is more than this server's limit of {limits.max_n}", param="n")
    if request.stream and request.choices > 1:
        raise ApiError(400, "stream with n > 1 is not supported; ask for one choice", param="n")
    if request.stream and request.tools:
        raise ApiError(400, "tool calls are not streamed; send tools without stream", param="stream")
    if "" in request.stop_words:
        raise ApiError(400, "stop: an empty stop string would end every reply before it starts", param="stop")
    for penalty in ("presence_penalty", "frequency_penalty"):
        if getattr(request, penalty):
            raise ApiError(400, f"{penalty} is not supported by this server; send 0 or leave it out", param=penalty)
    if request.model != model_name:
        raise ApiError(404, f"model {request.model!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    return request


class Slots:
    """Counts generations running or waiting; a request past the limit is refused, not queued forever."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self) -> None:
        if self.used >= self.limit:
            raise ApiError(429, f"{self.limit} generations are already running or waiting; retry shortly",
                           kind="rate_limit_error", code="too_many_requests")
        self.used += 1  # one event loop: no lock needed between the check and the increment

    def give(self) -> None:
        self.used -= 1


def create_app(engine: ChatEngine, api_key: str | None = None, limits: Limits = Limits()) -> FastAPI:
    app = FastAPI(title="TuneFactory", description=f"OpenAI-compatible API serving {engine.name}")
    slots = Slots(limits.max_concurrency)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)  # an unknown route or method, in OpenAI's shape too
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
                        ).response()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return ApiError(401, "invalid API key", code="invalid_api_key").response()
        return await call_next(request)

    def card() -> dict[str, Any]:
        return {"id": engine.name, "object": "model", "created": int(time.time()), "owned_by": "tunefactory"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model}")
    async def model(model: str) -> dict[str, Any]:
        if model != engine.name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {engine.name!r}",
                           param="model", code="model_not_found")
        return card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = parse_request(await request.body(), limits, engine.name)
        messages = plain_messages(chat)
        options = {"max_tokens": chat.max_completion_tokens or chat.max_tokens or limits.max_tokens,
                   "temperature": 1.0 if chat.temperature is None else chat.temperature,
                   "top_p": 1.0 if chat.top_p is None else chat.top_p, "stop": chat.stop_words, "seed": chat.seed}
        slots.take()
        if chat.stream:
            try:
                stream = engine.stream(messages, **options)
            except BaseException as exc:  # whatever ends the request before the stream has its slot
                slots.give()
                if isinstance(exc, MessageError):
                    raise ApiError(400, str(exc), param="messages") from None
                raise
            return StreamingResponse(released(events(stream, engine.name, chat), stream, slots),
                                     media_type="text/event-stream")
        try:
            replies = await run_in_threadpool(engine.generate, messages, n=chat.choices, tools=chat.tool_definitions,
                                              **options)
        except MessageError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        finally:
            slots.give()
        return completion(replies, engine.name)

    return app


async def released(chunks: Iterator[str], stream: ReplyStream, slots: Slots):
    """The stream's chunks (each waited for on a worker thread), giving its slot back when it ends, before its
    last chunk is sent (a client that asks again as soon as it reads [DONE] finds the slot free), or when the
    client goes; a client that goes stops the generation too."""
    held = True
    try:
        chunk = await run_in_threadpool(next, chunks, None)
        while chunk is not None:
            following = await run_in_threadpool(next, chunks, None)
            if following is None:
                held = False
                slots.give()
            yield chunk
            chunk = following
    finally:
        stream.cancel()
        if held:
            slots.give()


def completion(replies, model: str) -> dict[str, Any]:
    choices = []
    for index, reply in enumerate(replies):
        message: dict[str, Any] = {"role": "assistant", "content": reply.text if not reply.tool_calls else None}
        if reply.tool_calls:
            message["tool_calls"] = reply.tool_calls
        choices.append({"index": index, "message": message, "finish_reason": reply.finish_reason,
                        "logprobs": None})
    prompt_tokens = replies[0].prompt_tokens
    completion_tokens = sum(reply.completion_tokens for reply in replies)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def events(stream, model: str, chat: ChatRequest) -> Iterator[str]:
    """Server-sent events as OpenAI streams them: a role delta, content deltas, a finish chunk, optional
    usage, then [DONE]."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}

    def event(delta: dict[str, Any], finish: str | None = None) -> str:
        chunk = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant", "content": ""})
    for piece in stream:
        if piece:
            yield event({"content": piece})
    result = stream.result
    yield event({}, result.finish_reason if result else "stop")
    if chat.stream_options and chat.stream_options.include_usage and result:
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


def serve_api(engine: ChatEngine, host: str, port: int, api_key: str | None, limits: Limits) -> None:
    import uvicorn

    uvicorn.run(create_app(engine, api_key, limits), host=host, port=port, log_level="info")
