"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions and /health.

Every request is validated before it reaches the engine, so a request's bad values fail that request only;
every failure is answered in OpenAI's error shape, 4xx for anything the client sent. `stream: true`
answers with server-sent events in OpenAI's chunk format, ending with `[DONE]`. A client that goes away,
streaming or not, has its generation cancelled and its cache row freed. With an API key, every route but
/health wants it (the interactive docs and the OpenAPI schema included). Bodies are limited in size
(`limits.BodyLimit`), prompts are measured before they are tokenized, and tokenizing runs off the event
loop, so one huge prompt cannot stall everyone else's streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from dsv3.chat_template import ChatTemplate
from dsv3.errors import InvalidValue
from dsv3.infer import Engine, SamplingParams
from dsv3.serve.batcher import Batcher, Event, Handle, QueueFull
from dsv3.serve.limits import MAX_BODY_BYTES, BodyLimit
from dsv3.serve.protocol import APIError, ChatRequest, CompletionRequest, SamplingFields

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the server needs FastAPI and uvicorn: pip install 'dsv3[serve]'") from e

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_queue: int = 64
    default_max_tokens: int = 16  # completions; chat defaults to the rest of the context
    max_body_bytes: int = MAX_BODY_BYTES


def create_app(engine: Engine, tokenizer, config: ServerConfig, template: ChatTemplate | None = None) -> FastAPI:
    """The FastAPI app serving `engine`; the batching thread runs for the app's lifetime."""
    batcher = Batcher(engine, config.max_queue)
    api = _Api(engine, tokenizer, config, template or ChatTemplate(), batcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="dsv3", lifespan=lifespan)
    app.state.batcher = batcher
    _add_error_handlers(app)
    _add_auth(app, config)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)  # outermost: before anything reads the body

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "in_flight": batcher.in_flight,
                "free_slots": len(engine.free_rows), "slots": engine.max_batch}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": api.created,
                                            "owned_by": "dsv3", "max_model_len": engine.max_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await api.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await api.chat(body, request)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure in OpenAI's error shape."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":
            return await api_error(request, APIError(400, f"the body is not valid JSON: {err.get('msg')}",
                                                     code="invalid_json"))
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if param is None:  # the body as a whole: not an object, or not sent as JSON
            return await api_error(request, APIError(400, "the body must be a JSON object sent with "
                                                     "Content-Type: application/json", code="invalid_body"))
        if err.get("type") == "missing":
            message = f"missing required parameter '{param}'"
        else:
            message = f"invalid value for '{param}': {err.get('msg')}"
        return await api_error(request, APIError(400, message, code="invalid_value", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return await api_error(request, APIError(exc.status_code, str(exc.detail), code=None))


OPEN_PATHS = ("/health",)  # what answers without the API key: a liveness probe needs none


def _add_auth(app: FastAPI, config: ServerConfig) -> None:
    """With an API key, every route but /health wants 'Authorization: Bearer KEY'. The key and the header
    are compared as bytes in constant time: a header is bytes on the wire, whatever characters it holds."""
    if config.api_key is None:
        return
    # a non-ASCII key reaches us as UTF-8 from most clients, as Latin-1 from some (http.client): accept either
    expected = {config.api_key.encode("utf-8")}
    with contextlib.suppress(UnicodeEncodeError):  # only a key Latin-1 can spell has a Latin-1 form
        expected.add(config.api_key.encode("latin-1"))

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if request.url.path not in OPEN_PATHS:
            sent = next((v for k, v in request.scope["headers"] if k == b"authorization"), b"")
            scheme, _, key = sent.partition(b" ")
            matches = [secrets.compare_digest(key.strip(), e) for e in expected]  # every one, in constant time
            if scheme.lower() != b"bearer" or not any(matches):
                err = APIError(401, "missing or wrong API key; send 'Authorization: Bearer KEY'",
                               type="authentication_error", code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)


class _Api:
    """The two generation endpoints: requests turned into engine work, answers into OpenAI's shapes."""

    def __init__(self, engine: Engine, tokenizer, config: ServerConfig, template: ChatTemplate, batcher: Batcher):
        self.engine, self.tokenizer, self.config, self.template = engine, tokenizer, config, template
        self.batcher = batcher
        self.stop_ids = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()
        self.created = int(time.time())

    async def encode(self, text: str, param: str, bos: bool = False) -> list[int]:
        """Token ids of a prompt, tokenized off the event loop; one that cannot fit the context is refused
        from its length alone, before any tokenizing."""
        if len(text.encode("utf-8")) > self.engine.max_len * self.tokenizer.max_token_bytes:
            raise APIError(400, f"the {param} is longer than this model's context of {self.engine.max_len} tokens "
                           "could hold; shorten it", code="context_length_exceeded", param=param)
        return await asyncio.to_thread(self.tokenizer.encode, text, bos)

    async def completions(self, body: CompletionRequest, request: Request):
        vocab = self.engine.model.config.vocab_size
        if isinstance(body.prompt, str):
            prompt = await self.encode(body.prompt, "prompt", bos=True)
        else:
            prompt = list(body.prompt)
        if not all(0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        handle = self.submit(body, prompt, body.max_tokens or self.config.default_max_tokens, "prompt")
        rid = "cmpl-" + uuid.uuid4().hex

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": int(time.time()),
                    "model": self.config.model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            return sse(handle, request, body, lambda text: chunk(text, None), lambda ev: chunk("", ev.finish_reason),
                       chunk_usage(rid, "text_completion", len(prompt)))
        text, last = await collect(handle, request)
        return {**chunk(text, last.finish_reason), "usage": usage(len(prompt), last.n_tokens)}

    async def chat(self, body: ChatRequest, request: Request):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = self.template.render(messages, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        prompt = await self.encode(text, "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens or max(self.engine.max_len - len(prompt), 1)
        handle = self.submit(body, prompt, max_tokens, "messages")
        rid = "chatcmpl-" + uuid.uuid4().hex

        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": self.config.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        if body.stream:
            return sse(handle, request, body, lambda text: chunk({"content": text}, None),
                       lambda ev: chunk({}, ev.finish_reason), chunk_usage(rid, "chat.completion.chunk", len(prompt)),
                       first=chunk({"role": "assistant", "content": ""}, None))
        text, last = await collect(handle, request)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.config.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": last.finish_reason}],
                "usage": usage(len(prompt), last.n_tokens)}

    def submit(self, body: SamplingFields, prompt: list[int], max_tokens: int, prompt_param: str) -> Handle:
        name, max_len = self.config.model_name, self.engine.max_len
        if body.model != name:
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{name}'",
                           code="model_not_found", param="model")
        if len(prompt) + max_tokens > max_len:
            raise APIError(400, f"this model's context holds {max_len} tokens, but the prompt has "
                           f"{len(prompt)} and {max_tokens} more were requested; shorten the prompt or lower "
                           "max_tokens", code="context_length_exceeded", param=prompt_param)
        try:
            params = SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature,
                                    top_k=max(body.top_k, 0), top_p=body.top_p, seed=body.seed,
                                    stop_token_ids=self.stop_ids, stop=body.stop_strings())
        except InvalidValue as e:  # the protocol's own checks should have caught it: still the client's value
            raise APIError(400, f"invalid value for '{e.field}': {e.value!r} {e.why}", code="invalid_value",
                           param=e.field) from None
        try:
            return self.batcher.submit(prompt, params)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", type="rate_limit_error",
                           code="queue_full") from None


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk_usage(rid: str, obj: str, prompt_tokens: int):
    def make(ev: Event, model: str) -> dict:
        return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
                "usage": usage(prompt_tokens, ev.n_tokens)}

    return make


async def events(handle: Handle, batcher: Batcher) -> AsyncIterator[Event]:
    """The request's events until its last one; cancels the generation if the consumer stops early."""
    try:
        while True:
            ev = await handle.events.get()
            yield ev
            if ev.finish_reason is not None or ev.error is not None:
                return
    finally:
        batcher.cancel(handle)


async def collect(handle: Handle, request: Request) -> tuple[str, Event]:
    """Wait for the whole text of a non-streaming request, cancelling it if the client disconnects."""
    batcher = request.app.state.batcher
    parts = []
    try:
        while True:
            get = asyncio.ensure_future(handle.events.get())
            while not get.done():
                await asyncio.wait({get}, timeout=DISCONNECT_POLL_S)
                if not get.done() and await request.is_disconnected():
                    get.cancel()  # nobody will read the answer; 499 is nginx's "client closed request"
                    raise APIError(499, "the client closed the request", code="client_closed")
            ev = get.result()
            if ev.error is not None:
                raise APIError(503, ev.error, type="server_error", code="engine_error")
            parts.append(ev.text)
            if ev.finish_reason is not None:
                return "".join(parts), ev
    finally:
        batcher.cancel(handle)


def sse(handle: Handle, request: Request, body: SamplingFields, text_chunk, final_chunk, usage_chunk, first=None):
    """A server-sent-event stream of OpenAI chunks; the client leaving ends the generator, which cancels."""
    batcher = request.app.state.batcher
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    def data(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream():
        if first is not None:
            yield data(first)
        async for ev in events(handle, batcher):
            if ev.error is not None:
                yield data(APIError(503, ev.error, type="server_error", code="engine_error").body())
                break
            if ev.text:
                yield data(text_chunk(ev.text))
            if ev.finish_reason is not None:
                yield data(final_chunk(ev))
                if include_usage:
                    yield data(usage_chunk(ev, body.model))
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
