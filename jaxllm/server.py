"""`jaxllm serve`: an OpenAI-compatible HTTP server over the continuous-batching Engine.

The engine's thread owns the model loop; this module only parses, queues and streams. One HTTP request submits one
engine Request per choice. The engine hands each burst of new tokens to `on_event` on its own thread, which passes
it to the event loop with `call_soon_threadsafe`; there each choice turns tokens into text (a StreamDecoder, so a
character split over tokens is held until complete), matches stop strings, and the route writes OpenAI's response
or its server-sent events.

    engine = Engine(model, slots=8, max_context=2048).start()
    app = build_app(engine, "smollm2-135m")      # serve it with uvicorn; serve() does all of this for `jaxllm serve`
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import secrets
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
import uvicorn

from jaxllm.engine import ContextLengthError, Engine, EngineStopped, QueueFull, Request
from jaxllm.errors import InputError, JaxLLMError
from jaxllm.generation import UNKNOWN_TOKEN
from jaxllm.tokenizer import StreamDecoder

logger = logging.getLogger("uvicorn.error")  # uvicorn configures it: our lines read like its own

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_CHOICES = 16  # n: each choice is an engine request of its own
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
RETRY_AFTER_SECONDS = 1  # told to a client that met a full queue
DISCONNECT_POLL_SECONDS = 0.5  # how often a non-streaming request checks that its client is still there


# ---------------------------------------------------------------------------------------------------------------
# Errors: one exception type, rendered as OpenAI's envelope by one handler.


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def _validation_error(error: RequestValidationError) -> APIError:
    """The first field pydantic refused, named as the client wrote it (messages[0].content); a field that takes
    one of several shapes (prompt, stop, content) lists them instead of each shape's own complaint."""
    errors = error.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])} "
                             f"(at character {first['loc'][-1]})")
    field = _field_loc(first["loc"][1:])  # e.g. ('messages', 0, 'content')
    path = _param(field)
    if not path:
        return APIError(400, f"the body must be a JSON object: {first['msg']}")
    shapes = [loc[len(field)] for loc in (tuple(e["loc"][1:]) for e in errors)
              if loc[:len(field)] == field and len(loc) > len(field) and _is_union_tag(loc[len(field)])]
    found = "" if first["type"] == "missing" else f" (found {first['input']!r:.60})"
    if shapes:
        return APIError(400, f"{path}: must be one of {', '.join(dict.fromkeys(shapes))}{found}", param=path)
    return APIError(400, f"{path}: {first['msg'].removeprefix('Value error, ')}{found}", param=path)


def _is_union_tag(part) -> bool:
    """pydantic names the member of a union in the error location ('str', 'list[int]', 'list[ContentPart]')."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _field_loc(loc) -> tuple:
    """The location up to the first union tag."""
    for i, part in enumerate(loc):
        if _is_union_tag(part):
            return tuple(loc[:i])
    return tuple(loc)


def _param(loc) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or None


def _engine_error(error: Exception, param: str) -> APIError:
    """What a client is told when the engine refuses a request."""
    if isinstance(error, QueueFull):
        return APIError(429, f"the server is at capacity: {error}", "rate_limit_exceeded", code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(error, EngineStopped):
        return APIError(503, f"the engine takes no requests: {error}", "service_unavailable")
    if isinstance(error, ContextLengthError):
        return APIError(400, str(error), param=param, code="context_length_exceeded")
    return APIError(400, str(error))


# ---------------------------------------------------------------------------------------------------------------
# Requests, as OpenAI's schema has them. Extra fields are ignored (OpenAI's clients send some we do not use).


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Schema):
    include_usage: bool = False


class _GenerationRequest(_Schema):
    """The fields completions and chat share."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0 is greedy; OpenAI's default is 1
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # vLLM's extension: the k most likely tokens; 0 or -1 keep all
    seed: int | None = Field(None, ge=-2**63, lt=2**63)  # choice i samples with seed + i; None: a random seed
    # Strings that end the text (not returned), matched across token boundaries; a list once validated.
    stop: str | list[str] | None = Field(None, validate_default=True)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens through end-of-sequence tokens

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, body):
        """A field sent as null takes its default, as OpenAI's API reads it (clients send nulls for unset fields)."""
        return {key: value for key, value in body.items() if value is not None} if isinstance(body, dict) else body

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if "" in stops:
            raise ValueError("a stop string cannot be empty")
        return stops


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]  # text or token ids; a list of either is several prompts
    max_tokens: int = Field(DEFAULT_COMPLETION_TOKENS, ge=1)


class ContentPart(_Schema):
    type: Literal["text"]
    text: str


class ChatMessage(_Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: what the context leaves after the prompt
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


# ---------------------------------------------------------------------------------------------------------------
# Metrics: gauges read the engine, the rest count what passed through this app.


class Metrics:
    """Prometheus metrics in a registry of the app's own (several apps, each with its engine, can share a process)."""

    def __init__(self, engine: Engine):
        self.registry = registry = CollectorRegistry()
        Gauge("jaxllm_requests_running", "Requests in engine slots", registry=registry).set_function(
            lambda: engine.running)
        Gauge("jaxllm_requests_waiting", "Requests queued for a slot", registry=registry).set_function(
            lambda: engine.waiting)
        self.prompt_tokens = Counter("jaxllm_prompt_tokens", "Prompt tokens submitted (once per choice: each is "
                                     "prefilled)", registry=registry)
        self.generation_tokens = Counter("jaxllm_generation_tokens", "Tokens generated", registry=registry)
        self.finished = Counter("jaxllm_requests_finished", "Choices finished, by finish reason (cancelled: the "
                                "client went away)", ["finish_reason"], registry=registry)
        self.time_to_first_token = Histogram(
            "jaxllm_time_to_first_token_seconds", "From submission to the first token of a choice",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=registry)
        self.inter_token_latency = Histogram(
            "jaxllm_inter_token_latency_seconds", "Time between tokens: the gap since a choice's previous burst of "
            "tokens, shared among the burst's tokens",
            buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5), registry=registry)


# ---------------------------------------------------------------------------------------------------------------
# From engine tokens to the text a client sees.


@dataclasses.dataclass
class Event:
    """One burst from the engine, as it crosses to the event loop."""

    choice: int
    tokens: list[int]
    finish_reason: str | None  # the engine's: "stop", "length", "cancelled" or None
    at: float  # time.perf_counter() on the engine thread


@dataclasses.dataclass
class Choice:
    """One engine request and the text made of its tokens so far."""

    index: int
    request: Request
    decoder: StreamDecoder
    stops: list[str]
    submitted_at: float = 0.0  # time.perf_counter() when the engine took it
    held: str = ""  # decoded, not yet released: it could still be the start of a stop string
    text: str = ""  # everything released
    completion_tokens: int = 0  # tokens made, up to the one that completed a stop string
    finish_reason: str | None = None  # OpenAI's: "stop" or "length" once finished
    last_at: float | None = None  # when the previous burst arrived

    def feed(self, event: Event) -> str:
        """Take a burst of tokens; return the text it releases (finish_reason is set once it is the last)."""
        out = ""
        for token in event.tokens:
            self.completion_tokens += 1
            if token not in self.request.stop_ids:  # a stop id (end of sequence) has no text
                self.held += self.decoder.push(token)
            out += self._release(final=False)
            if self.finish_reason is not None:  # a stop string matched: the tokens after it are dropped
                break
        else:
            if event.finish_reason is not None:
                self.held += self.decoder.flush()
                out += self._release(final=True)
                # the engine's "stop" and "length" are OpenAI's; "error" (the engine failed) is passed on as it is
                self.finish_reason = self.finish_reason or event.finish_reason
        self.text += out
        return out

    def _release(self, final: bool) -> str:
        """The part of `held` that is certain: up to the first stop string (which finishes the choice), else all
        but the longest tail that could begin a stop string (at the end, all of it)."""
        hits = [at for stop in self.stops if (at := self.held.find(stop)) >= 0]
        if hits:
            out, self.held, self.finish_reason = self.held[:min(hits)], "", "stop"
            return out
        keep = 0 if final else max((k for stop in self.stops for k in range(min(len(stop) - 1, len(self.held)), 0, -1)
                                    if self.held.endswith(stop[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out


class Generation:
    """The engine requests of one HTTP request (n choices per prompt) and the queue their tokens come back on."""

    def __init__(self, service: Service, prompts: list[list[int]], max_tokens: int, body: _GenerationRequest,
                 prompt_param: str):
        self.service = service
        self.prompts = prompts
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        stop_ids = () if body.ignore_eos else tuple(service.engine.eos_ids)
        tokenizer = service.tokenizer
        self.choices: list[Choice] = []
        for p, prompt in enumerate(prompts):
            if len(prompt) + max_tokens > service.engine.max_context:
                raise APIError(400, f"this model's maximum context length is {service.engine.max_context} tokens; "
                                    f"the request asks for {len(prompt) + max_tokens} ({len(prompt)} in the prompt, "
                                    f"{max_tokens} for the completion)", param=prompt_param,
                               code="context_length_exceeded")
            for j in range(body.n):
                index = p * body.n + j
                request = Request(prompt=prompt, max_tokens=max_tokens, temperature=body.temperature,
                                  top_k=max(body.top_k, 0), top_p=body.top_p, seed=seed + j, stop_ids=stop_ids,
                                  on_event=self._on_event(loop, index))
                decoder = tokenizer.stream(skip_special_tokens=True, unknown=UNKNOWN_TOKEN)
                self.choices.append(Choice(index, request, decoder, body.stop))
        for i, choice in enumerate(self.choices):
            try:
                service.engine.submit(choice.request)
            except JaxLLMError as error:
                for submitted in self.choices[:i]:
                    service.engine.cancel(submitted.request)
                raise _engine_error(error, prompt_param) from error
            choice.submitted_at = time.perf_counter()
            service.metrics.prompt_tokens.inc(len(choice.request.prompt))

    def _on_event(self, loop: asyncio.AbstractEventLoop, index: int) -> Callable:
        """The engine's callback for choice `index`: runs on the engine thread, so it only hands the burst over."""
        queue = self.queue

        def on_event(request: Request, tokens: list[int], finish_reason: str | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, Event(index, list(tokens), finish_reason,
                                                                  time.perf_counter()))
            except RuntimeError:  # the event loop has closed (the server stopped): no one is listening
                pass

        return on_event

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    async def events(self, http: HTTPRequest | None = None) -> AsyncIterator[tuple[Choice, str]]:
        """(choice, released text) as bursts arrive, until every choice has finished. With `http`, the client is
        polled between bursts and its requests cancelled when it has gone (a streaming response learns of that
        from Starlette, which cancels the stream)."""
        metrics = self.service.metrics
        next_poll = time.monotonic() + DISCONNECT_POLL_SECONDS
        while not self.done:
            if http is None:
                event = await self.queue.get()
            else:
                if time.monotonic() >= next_poll:
                    if await http.is_disconnected():
                        self.cancel()
                        return
                    next_poll = time.monotonic() + DISCONNECT_POLL_SECONDS
                try:
                    event = await asyncio.wait_for(self.queue.get(), max(next_poll - time.monotonic(), 0.0))
                except asyncio.TimeoutError:
                    continue
            choice = self.choices[event.choice]
            if choice.finish_reason is not None:  # finished on a stop string; the engine's last words
                continue
            metrics.generation_tokens.inc(len(event.tokens))
            if event.tokens:
                if choice.last_at is None:
                    metrics.time_to_first_token.observe(event.at - choice.submitted_at)
                else:
                    for _ in event.tokens:
                        metrics.inter_token_latency.observe((event.at - choice.last_at) / len(event.tokens))
                choice.last_at = event.at
            text = choice.feed(event)
            if choice.finish_reason is not None:
                if event.finish_reason is None:  # a stop string: free the slot now
                    self.service.engine.cancel(choice.request)
                metrics.finished.labels(choice.finish_reason).inc()
            yield choice, text

    def cancel(self) -> None:
        """Cancel the choices still running (idempotent): the client has gone."""
        for choice in self.choices:
            if choice.finish_reason is None:
                self.service.engine.cancel(choice.request)
                choice.finish_reason = "cancelled"
                self.service.metrics.finished.labels("cancelled").inc()

    def usage(self) -> dict:
        prompt = sum(map(len, self.prompts))
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---------------------------------------------------------------------------------------------------------------
# The app: one function per route.


class Service:
    """What the routes share: the engine, its tokenizer, the served name, the metrics, and whether it is ready."""

    def __init__(self, engine: Engine, model_name: str, ready: threading.Event | None):
        if engine.model.tokenizer is None:
            raise InputError("serving needs the model's tokenizer: load it with jaxllm.load_model")
        self.engine = engine
        self.tokenizer = engine.model.tokenizer
        self.vocab_size = engine.model.params.config.vocab_size
        self.model_name = model_name
        self.metrics = Metrics(engine)
        self.ready = ready
        self.created = int(time.time())

    @property
    def is_ready(self) -> bool:
        """The engine has started and its scheduler has not failed."""
        return (self.ready is None or self.ready.is_set()) and self.engine.error is None

    def check(self, body: _GenerationRequest) -> None:
        if not self.is_ready:
            raise APIError(503, "the engine is not ready (still compiling, or failed: the server's log says); "
                                "GET /health answers 200 once it can serve", "service_unavailable")
        if body.model != self.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def completion_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """Token ids of each prompt: text is encoded as the checkpoint does (BOS where it adds one)."""
        single = isinstance(prompt, str) or (prompt and isinstance(prompt[0], int))
        prompts = [prompt] if single else prompt
        if not prompts:
            raise APIError(400, "prompt: no prompt given", param="prompt")
        ids = [self.encode(p, add_special_tokens=True) if isinstance(p, str) else p for p in prompts]
        for row, p in enumerate(ids):
            where = f"prompt {row}" if not single else "the prompt"
            if not p:
                raise APIError(400, f"prompt: {where} holds no tokens", param="prompt")
            bad = next((i for i, t in enumerate(p) if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"prompt: token id {p[bad]} at position {bad} of {where} is outside the "
                                    f"vocabulary [0, {self.vocab_size})", param="prompt")
        return ids

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        """The model's chat template over the messages, ready for the assistant's turn. The rendered text carries
        its own special tokens, so it is encoded without adding BOS again."""
        turns = [{"role": m.role, "content": _content_text(m.content), **({"name": m.name} if m.name else {})}
                 for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True)
        except JaxLLMError as error:
            raise APIError(400, f"messages: {error}", param="messages") from error
        return self.encode(text, add_special_tokens=False)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except JaxLLMError as error:
            raise APIError(400, str(error)) from error


def _content_text(content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(part.text for part in content)


def build_app(engine: Engine, model_name: str, api_key: str | None = None, *,
              ready: threading.Event | None = None) -> FastAPI:
    """The OpenAI-compatible app over a running engine. `ready`: set once the engine has started (until then
    /health answers 503 and generation routes refuse); None when the caller has started it already."""
    service = Service(engine, model_name, ready)
    app = FastAPI(title="jaxllm", description="An OpenAI-compatible server over jaxllm's engine")
    app.state.service = service
    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: HTTPRequest, error: RequestValidationError) -> JSONResponse:
        return _validation_error(error).response()  # 400, as OpenAI answers, not FastAPI's 422

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, error: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return APIError(error.status_code, str(error.detail), kind, headers=error.headers).response()

    @app.exception_handler(Exception)
    async def server_error(request: HTTPRequest, error: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return APIError(500, f"internal error: {type(error).__name__}: {error}", "server_error").response()

    @app.get("/health")
    async def health() -> JSONResponse:
        if service.is_ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": service.created,
                                            "owned_by": "jaxllm", "max_model_len": engine.max_context}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        service.check(body)
        generation = Generation(service, service.completion_prompts(body.prompt), body.max_tokens, body, "prompt")
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}

        def chunk(choice: Choice, text: str) -> dict:
            return {"index": choice.index, "text": text, "logprobs": None, "finish_reason": choice.finish_reason}

        if body.stream:
            return _event_stream(generation, head, chunk, (), body.stream_options)
        if not await _finish(generation, http):
            return Response(status_code=499)  # the client has gone; no one reads this
        choices = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                   for c in generation.choices]
        return {**head, "choices": choices, "usage": generation.usage()}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        service.check(body)
        prompt = service.chat_prompt(body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(engine.max_context - len(prompt), 1)
        generation = Generation(service, [prompt], max_tokens, body, "messages")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model_name}

        def chunk(choice: Choice, text: str) -> dict:
            delta = {"content": text} if text else {}
            return {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": choice.finish_reason}

        if body.stream:
            opening = [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None} for c in generation.choices]
            return _event_stream(generation, head, chunk, opening, body.stream_options)
        if not await _finish(generation, http):
            return Response(status_code=499)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                    "finish_reason": c.finish_reason} for c in generation.choices]
        return {**head, "object": "chat.completion", "choices": choices, "usage": generation.usage()}

    return app


async def _finish(generation: Generation, http: HTTPRequest) -> bool:
    """Run a non-streaming request to its end; False when its client went away first (it is cancelled then)."""
    try:
        async for _ in generation.events(http):
            pass
    finally:
        generation.cancel()  # no-op once every choice has finished
    if any(c.finish_reason == "error" for c in generation.choices):
        raise APIError(500, "the engine failed while generating (the server's log has the cause)", "server_error")
    return generation.done and not any(c.finish_reason == "cancelled" for c in generation.choices)


def _event_stream(generation: Generation, head: dict, chunk: Callable[[Choice, str], dict], opening,
                  options: StreamOptions | None) -> StreamingResponse:
    """Server-sent events: a chunk per burst that releases text or finishes a choice, the usage chunk (with
    stream_options.include_usage), then [DONE]. Starlette cancels the stream when the client disconnects; the
    choices still running are cancelled then."""
    include_usage = options is not None and options.include_usage
    usage_field = {"usage": None} if include_usage else {}

    def data(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

    async def stream() -> AsyncIterator[str]:
        try:
            if opening:
                yield data({**head, "choices": list(opening), **usage_field})
            async for choice, text in generation.events():
                if text or choice.finish_reason is not None:
                    yield data({**head, "choices": [chunk(choice, text)], **usage_field})
            if include_usage:
                yield data({**head, "choices": [], "usage": generation.usage()})
            yield "data: [DONE]\n\n"
        finally:
            generation.cancel()

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class BearerAuth:
    """ASGI middleware: every route but /health needs `Authorization: Bearer <api key>` (401 otherwise). It runs
    before the body is read, so an unauthenticated client learns nothing about its request."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "a valid API key is needed: send the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------------------------
# The process: uvicorn in the main thread, the engine in its own.


class _Server(uvicorn.Server):
    """uvicorn's server, except that SIGTERM and SIGINT end `run` normally once it has shut down (uvicorn raises
    the signal again then, which would kill the process before the engine drains and exit non-zero)."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(model, model_name: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          slots: int = 8, max_context: int = 2048, decode_steps: int = 8, prefill_chunk: int = 256,
          max_waiting: int = 64, log_level: str = "info", speculate: str | None = None, draft=None) -> None:
    """Serve `model` until SIGTERM or SIGINT. The port opens at once, /health answers 503 while the engine
    compiles; on a signal uvicorn stops accepting, lets running responses finish, then the engine drains."""
    engine = Engine(model, slots=slots, max_context=max_context, decode_steps=decode_steps, prefill_chunk=prefill_chunk,
                    max_waiting=max_waiting, speculate=speculate, draft=draft)
    ready = threading.Event()
    server = _Server(uvicorn.Config(build_app(engine, model_name, api_key, ready=ready), host=host, port=port,
                                    log_level=log_level))
    failed: list[BaseException] = []

    def start() -> None:
        try:
            engine.start()
            ready.set()
            logger.info("%s is ready on http://%s:%d (KV cache: %d slots x %d positions, %.0f MiB)", model_name, host,
                        port, slots, engine.length, engine.cache_bytes / 2**20)
        except BaseException as error:  # noqa: BLE001 (handed to the main thread, which raises it)
            failed.append(error)
            server.should_exit = True

    logger.info("compiling the engine's programs (slots %d, max context %d); /health answers 503 until they are "
                "ready", slots, max_context)
    starter = threading.Thread(target=start, name="jaxllm-engine-start", daemon=True)
    starter.start()
    server.run()
    starter.join()
    if ready.is_set():
        engine.stop(drain=True)
    if failed:
        raise failed[0]
