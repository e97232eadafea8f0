"""The OpenAI-compatible HTTP server: a FastAPI app over an `AsyncEngine`.

    /v1/completions, /v1/chat/completions   (SSE streaming with "stream": true)
    /v1/models, /health, /metrics

A request is checked before it reaches the engine (its fields, the model name, its prompt's
length: 400/404/413, the in-flight bound: 429); each of its n completions (and each prompt of a
batched completions request) is one engine request. Every error is a JSON body in OpenAI's
schema, and no error leaves the server unable to serve the next request. A client that goes away
(a closed stream, or a dropped connection while a non-streamed answer is being generated) has its
engine requests aborted, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_engine import AsyncEngine, EngineStopped
from engine.prompts import check_prompt
from engine.request_output import RequestOutput
from engine.sampling import completion_seed
from kernels.errors import InputError, QShardError
from launch.server import metrics
from launch.server.protocol import (ApiError, ChatRequest, CompletionRequest, chat_body, chat_logprobs,
                                    completion_body, completion_logprobs, error_body, sampling_params, usage,
                                    validation_message)

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


@dataclass
class ServeConfig:
    model_name: str  # what /v1/models lists
    max_model_len: int
    vocab_size: int
    aliases: tuple[str, ...] = ()  # other names a request may use for the model
    api_key: str | None = None
    max_in_flight: int = 1024  # engine requests accepted and unfinished; beyond it: 429
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class _Choice:
    """One engine request of an HTTP request: its place in `choices` and what was sent so far."""

    index: int
    prompt_tokens: int
    prompt_text: str | None
    tokens_sent: int = 0
    chars_sent: int = 0
    started: bool = False  # chat: the role delta went out
    final: RequestOutput | None = None


class _Call:
    """The engine requests of one HTTP request and the queue their outputs arrive in."""

    def __init__(self, engine: AsyncEngine, prefix: str):
        self.engine = engine
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.sink: asyncio.Queue = asyncio.Queue()
        self.choices: dict[str, _Choice] = {}
        self.pending: set[str] = set()

    def add(self, choice: _Choice, ids: list[int], params, arrived: float) -> None:
        sub = f"{self.id}-{choice.index}"
        self.choices[sub] = choice
        self.pending.add(sub)
        self.engine.add(sub, ids, params, choice.prompt_text, self.sink, arrived)

    async def next(self, timeout_s: float | None = None) -> tuple[_Choice, RequestOutput]:
        """The next output of any of its engine requests; an engine error is raised."""
        sub, item = await asyncio.wait_for(self.sink.get(), timeout_s)
        choice = self.choices[sub]
        if isinstance(item, BaseException):
            self.pending.discard(sub)
            raise item
        if item.finished:
            self.pending.discard(sub)
            choice.final = item
        return choice, item

    def abort(self) -> None:
        for sub in self.pending:
            self.engine.abort(sub)
        self.pending.clear()


def create_app(engine: AsyncEngine, tokenizer, config: ServeConfig) -> FastAPI:
    """The app; it starts the engine thread when it starts and stops it when it stops.
    `tokenizer` is the front end's own (the engine thread detokenizes with another)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(asyncio.get_running_loop())
        logger.info("serving %s (max_model_len %d)", config.model_name, config.max_model_len)
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="qshard", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    names = {config.model_name, *config.aliases}
    if config.api_key:
        app.add_middleware(ApiKeyGuard, key=config.api_key)

    # -- errors ---------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError):
        message, param = validation_message(list(e.errors()))
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = (f"{request.method} {request.url.path}: no such route" if e.status_code == 404
                   else str(e.detail))
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(message, kind, None, e.status_code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        logger.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    # -- plain routes ---------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if not engine.healthy:
            return JSONResponse({"status": "error", "error": str(engine.failure)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(engine, config.model_name), media_type=metrics.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": config.created,
                                            "owned_by": "qshard", "max_model_len": config.max_model_len}]}

    # -- checks ---------------------------------------------------------------------------------

    def check_model(name: str) -> None:
        if name not in names:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {config.model_name!r}",
                           "model", "model_not_found")

    def check_ready(count: int) -> None:
        if not engine.healthy:
            raise ApiError(503, f"the engine stopped: {engine.failure}", None, None, "server_error")
        if engine.in_flight + count > config.max_in_flight:
            raise ApiError(429, f"the server has {engine.in_flight} requests in flight (at most "
                                f"{config.max_in_flight}); retry later", None, "too_many_requests", "rate_limit_error")

    def tokenize(index: int, prompt) -> tuple[str | None, list[int]]:
        try:
            text, ids = check_prompt(index, prompt, tokenizer, config.vocab_size, config.model_name)
        except InputError as e:
            raise ApiError(400, str(e), "prompt") from None
        if len(ids) >= config.max_model_len:
            raise ApiError(413, f"the prompt has {len(ids)} tokens; max_model_len={config.max_model_len} leaves no "
                                f"room to generate", "prompt", "context_length_exceeded")
        return text, ids

    def token_budget(asked: int | None, default: int | None, prompt_len: int, field_name: str) -> int:
        room = config.max_model_len - prompt_len
        if asked is None:
            return room if default is None else min(default, room)
        if asked > room:
            raise ApiError(400, f"{field_name}={asked} with a {prompt_len}-token prompt exceeds max_model_len="
                                f"{config.max_model_len} (at most {room})", field_name, "context_length_exceeded")
        return asked

    # -- completions ----------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        arrived = _now()
        check_model(body.model)
        if body.suffix:
            raise ApiError(400, "suffix is not supported", "suffix")
        if body.best_of not in (None, 1, body.n):
            raise ApiError(400, "best_of other than n is not supported", "best_of")
        prompts = _prompt_list(body.prompt)
        tokenized = [tokenize(i, p) for i, p in enumerate(prompts)]
        plans = []
        for i, (text, ids) in enumerate(tokenized):
            budget = token_budget(body.max_tokens, 16, len(ids), "max_tokens")
            for j in range(body.n):
                plans.append((i * body.n + j, text, ids,
                              sampling_params(body, budget, body.logprobs, completion_seed(body.seed, j))))
        check_ready(len(plans))
        call = _Call(engine, "cmpl")
        for index, text, ids, params in plans:
            call.add(_Choice(index, len(ids), text), ids, params, arrived)
        prompt_tokens = sum(len(ids) for _, ids in tokenized)

        def choice_body(choice: _Choice, out: RequestOutput, final: bool) -> dict:
            if final:
                text, tokens = out.text, out.token_ids
                if body.echo:
                    text = (choice.prompt_text or "") + text
            else:
                text, tokens = out.delta, out.token_ids[choice.tokens_sent:]
            lp = None
            if body.logprobs is not None and out.logprobs is not None:
                start = 0 if final else choice.tokens_sent
                lp = completion_logprobs(tokenizer, tokens, out.logprobs[start:start + len(tokens)],
                                         0 if final else choice.chars_sent)
            choice.tokens_sent, choice.chars_sent = len(out.token_ids), choice.chars_sent + len(out.delta)
            return {"index": choice.index, "text": text, "logprobs": lp,
                    "finish_reason": _reason(out) if out.finished else None}

        if body.stream:
            async def chunks():
                if body.echo:
                    for choice in sorted(call.choices.values(), key=lambda c: c.index):
                        yield _sse(completion_body(call.id, body.model, [{"index": choice.index, "text":
                                                   choice.prompt_text or "", "logprobs": None,
                                                   "finish_reason": None}], None, chunk=True))
                async for choice, out in _stream(call):
                    yield _sse(completion_body(call.id, body.model, [choice_body(choice, out, False)], None,
                                               chunk=True))
                if body.include_usage():
                    yield _sse(completion_body(call.id, body.model, [], _usage(call, prompt_tokens), chunk=True))

            return _streaming(call, chunks())
        await _collect(call, request)
        choices = [choice_body(c, c.final, True) for c in sorted(call.choices.values(), key=lambda c: c.index)]
        return completion_body(call.id, body.model, choices, _usage(call, prompt_tokens))

    # -- chat -----------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        arrived = _now()
        check_model(body.model)
        if body.tools:
            raise ApiError(400, "tools are not supported", "tools")
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, f"{config.model_name} has no chat template: use /v1/completions", "messages")
        try:
            text = tokenizer.apply_chat_template(body.conversation(), tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template that refuses the conversation (roles out of order, say)
            raise ApiError(400, f"the chat template refused these messages: {e}", "messages") from None
        text, ids = tokenize(0, text)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        budget = token_budget(asked, None, len(ids), "max_completion_tokens" if body.max_completion_tokens
                              is not None else "max_tokens")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        plans = [(j, sampling_params(body, budget, logprobs, completion_seed(body.seed, j))) for j in range(body.n)]
        check_ready(len(plans))
        call = _Call(engine, "chatcmpl")
        for index, params in plans:
            call.add(_Choice(index, len(ids), text), ids, params, arrived)

        def logprobs_of(out: RequestOutput, start: int, count: int):
            if logprobs is None or out.logprobs is None:
                return None
            return chat_logprobs(tokenizer, out.token_ids[start:start + count], out.logprobs[start:start + count],
                                 logprobs)

        if body.stream:
            async def chunks():
                async for choice, out in _stream(call):
                    delta: dict[str, Any] = {}
                    if not choice.started:
                        delta["role"] = "assistant"
                        choice.started = True
                    if out.delta or "role" in delta:
                        delta["content"] = out.delta
                    new = len(out.token_ids) - choice.tokens_sent
                    lp = logprobs_of(out, choice.tokens_sent, new)
                    choice.tokens_sent = len(out.token_ids)
                    yield _sse(chat_body(call.id, body.model, [{"index": choice.index, "delta": delta, "logprobs": lp,
                                                                "finish_reason": _reason(out) if out.finished
                                                                else None}], None, chunk=True))
                if body.include_usage():
                    yield _sse(chat_body(call.id, body.model, [], _usage(call, len(ids)), chunk=True))

            return _streaming(call, chunks())
        await _collect(call, request)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.final.text},
                    "logprobs": logprobs_of(c.final, 0, len(c.final.token_ids)), "finish_reason": _reason(c.final)}
                   for c in sorted(call.choices.values(), key=lambda c: c.index)]
        return chat_body(call.id, body.model, choices, _usage(call, len(ids)))

    return app


# -- helpers -------------------------------------------------------------------------------------


def _now() -> float:
    return time.monotonic()


def _prompt_list(prompt) -> list:
    """A completions `prompt` as a list of prompts (a str or one token-id list is one prompt)."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    if not prompt:
        raise ApiError(400, "prompt: an empty list", "prompt")
    return list(prompt)


def _reason(out: RequestOutput) -> str:
    return "length" if out.finish_reason == "length" else "stop"


def _usage(call: _Call, prompt_tokens: int) -> dict:
    return usage(prompt_tokens, sum(len(c.final.token_ids) for c in call.choices.values() if c.final is not None))


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _engine_error(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, InputError):
        return ApiError(400, str(e))
    if isinstance(e, EngineStopped):
        return ApiError(503, str(e), None, "shutting_down", "server_error")
    kind = "server_error"
    if isinstance(e, QShardError):
        return ApiError(500, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", None, None, kind)
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", None, None, kind)


async def _stream(call: _Call):
    """Every output of the call's engine requests until all finished (an engine error is raised)."""
    while call.pending:
        yield await call.next()


def _streaming(call: _Call, chunks) -> StreamingResponse:
    """SSE of `chunks`, then [DONE]; an error mid-stream is one error event. A client that goes
    away cancels the generator: its engine requests are aborted."""

    async def events():
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as e:
            error = _engine_error(e)
            logger.warning("%s failed mid-stream: %s", call.id, error.message)
            yield _sse(error.body())
        finally:
            if call.pending:
                logger.info("%s: client gone or stream ended early; aborting %d engine requests", call.id,
                            len(call.pending))
            call.abort()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _collect(call: _Call, request: Request) -> None:
    """Wait for every engine request to finish; abort them if the client goes away."""
    try:
        while call.pending:
            try:
                await call.next(DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    logger.info("%s: client gone; aborting", call.id)
                    raise ApiError(499, "client disconnected") from None
            except ApiError:
                raise
            except Exception as e:
                raise _engine_error(e) from e
    finally:
        call.abort()


class ApiKeyGuard:
    """ASGI middleware: /v1/* needs `Authorization: Bearer KEY` (constant-time comparison);
    /health and /metrics stay open."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                what = "no API key" if not header else "an incorrect API key"
                response = JSONResponse(error_body(f"{what} was provided (Authorization: Bearer <key>)",
                                                   "authentication_error", None, "invalid_api_key"), status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

