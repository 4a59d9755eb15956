"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, vLLM's /tokenize,
/detokenize and /tokenizer_info, /health, and the chat page at /.

Every request is validated before it reaches the engine, so a request's bad values fail that request only;
every failure is answered in OpenAI's error shape, 4xx for anything the client sent. `stream: true`
answers with server-sent events in OpenAI's chunk format, ending with `[DONE]`. A client that goes away,
streaming or not, has its generation cancelled and its cache row freed. With an API key, every route but
/health and the page wants it (the interactive docs and the OpenAPI schema included). Bodies are limited in size
(`limits.BodyLimit`), prompts are measured before they are tokenized, and tokenizing runs off the event
loop, so one huge prompt cannot stall everyone else's streams. Chat requests take vLLM's `chat_template_kwargs`;
in thinking mode (its `thinking` or `enable_thinking`, else the server's default) the reasoning is answered
apart from the answer, as `reasoning_content`, streamed in deltas of its own before the answer's.
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
from dsv3.infer import Engine, SamplingParams, Sequence
from dsv3.infer.logprobs import TokenLogprob
from dsv3.infer.reasoning import ReasoningSplitter, split_reasoning
from dsv3.serve.batcher import Batcher, Event, Handle, QueueFull
from dsv3.serve.limits import MAX_BODY_BYTES, BodyLimit
from dsv3.serve.logprobs import chat_logprobs, completion_logprobs
from dsv3.serve.page import add_page
from dsv3.serve.protocol import (
    ALLOWED,
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TemplateKwargs,
    TokenizeRequest,
)

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
    # thinking mode for chat requests whose chat_template_kwargs do not say (None: the chat format's default,
    # off for DeepSeek-V3.1's); in thinking mode the reasoning is answered apart, as reasoning_content
    thinking: bool | None = None
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
                "free_slots": engine.free_slots, "slots": engine.max_batch,
                "cache_blocks_in_use": engine.pool.in_use, "prefix_hit_rate": engine.stats.prefix_hit_rate,
                "speculative": engine.speculative, "mtp_acceptance": engine.stats.acceptance,
                "draft_tokens": engine.draft_tokens, "mtp_acceptance_by_position": engine.stats.acceptance_by_position,
                "mtp_draft_accepted": list(engine.stats.draft_accepted),
                "mtp_draft_proposed": list(engine.stats.draft_proposed)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": api.created,
                                            "owned_by": "dsv3", "max_model_len": engine.max_len}]}

    _add_tokenizer_routes(app, api)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await api.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await api.chat(body, request)

    add_page(app)
    return app


def _add_tokenizer_routes(app: FastAPI, api: _Api) -> None:
    """vLLM's /tokenize, /detokenize and /tokenizer_info (lm-evaluation-harness tokenizes through them)."""
    tok = api.tokenizer

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        api.check_model(body.model)
        if body.prompt is not None:
            ids = await api.encode(body.prompt, "prompt", bos=body.add_special_tokens is not False)
        else:
            text = api.render(body.messages, body.add_generation_prompt, body.chat_template_kwargs)
            ids = await api.encode(text, "messages", bos=bool(body.add_special_tokens))
        strs = [tok.id_to_token(t) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": api.engine.max_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        api.check_model(body.model)
        api.check_ids(body.tokens, "tokens")
        return {"prompt": await asyncio.to_thread(tok.decode, body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        settings = {k: v for k, v in (tok.config or {}).items() if isinstance(v, (str, int, float, bool))}
        return {**settings, "tokenizer_class": settings.get("tokenizer_class", "PreTrainedTokenizerFast"),
                "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
                "model_max_length": api.engine.max_len, "vocab_size": api.engine.model.config.vocab_size,
                "chat_template": api.template.source}


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
        param = _param(err.get("loc", ()))
        if param is None and err.get("type") == "value_error":  # a check across fields: its message names them
            message = str(err.get("msg")).removeprefix("Value error, ")
            return await api_error(request, APIError(400, message, code="invalid_value"))
        if param is None:  # the body as a whole: not an object, or not sent as JSON
            return await api_error(request, APIError(400, "the body must be a JSON object sent with "
                                                     "Content-Type: application/json", code="invalid_body"))
        field = next(p for p in reversed(param.split(".")) if not p.isdigit())
        if err.get("type") == "missing":
            message = f"missing required parameter '{param}'"
        elif err.get("type") == "value_error":  # our own checks say what is wrong
            message = f"invalid value for '{param}': {str(err.get('msg')).removeprefix('Value error, ')}"
        elif field in ALLOWED:
            message = f"invalid value for '{param}': must be {ALLOWED[field]}"
        else:
            message = f"invalid value for '{param}': {err.get('msg')}"
        return await api_error(request, APIError(400, message, code="invalid_value", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return await api_error(request, APIError(exc.status_code, str(exc.detail), code=None))


def _param(loc) -> str | None:
    """The field a validation error is about, as 'messages.0.role', without pydantic's names for the members
    of a union ('constrained-str', 'list[int]')."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(p for p in parts if (p.isidentifier() and p not in _TYPE_NAMES) or p.isdigit()) or None


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}

OPEN_PATHS = ("/health", "/")  # what answers without the API key: a liveness probe and the chat page need none


def _add_auth(app: FastAPI, config: ServerConfig) -> None:
    """With an API key, every route but OPEN_PATHS wants 'Authorization: Bearer KEY'. The key and the header
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
    """The generation endpoints: requests turned into engine work, answers into OpenAI's shapes."""

    def __init__(self, engine: Engine, tokenizer, config: ServerConfig, template: ChatTemplate, batcher: Batcher):
        self.engine, self.tokenizer, self.config, self.template = engine, tokenizer, config, template
        self.batcher = batcher
        self.stop_ids = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()
        self.created = int(time.time())

    async def encode(self, text: str, param: str, bos: bool = False) -> list[int]:
        """Token ids of a prompt, tokenized off the event loop, with BOS first when `bos` and the text does not
        already begin with it. One that cannot fit the context is refused from its length alone, before any
        tokenizing."""
        if len(text.encode("utf-8")) > self.engine.max_len * self.tokenizer.max_token_bytes:
            raise APIError(400, f"the {param} is longer than this model's context of {self.engine.max_len} tokens "
                           "could hold; shorten it", code="context_length_exceeded", param=param)
        ids = await asyncio.to_thread(self.tokenizer.encode, text)
        return self.with_bos(ids) if bos else ids

    def with_bos(self, ids: list[int]) -> list[int]:
        bos_id = self.tokenizer.bos_id
        return [bos_id, *ids] if bos_id is not None and ids[:1] != [bos_id] else ids

    def thinking(self, kwargs: TemplateKwargs | None) -> bool | None:
        """The request's thinking switch, else the server's."""
        switch = kwargs.switch() if kwargs is not None else None
        return self.config.thinking if switch is None else switch

    def render(self, messages: list, add_generation_prompt: bool = True, kwargs: TemplateKwargs | None = None
               ) -> str:
        """Chat messages through the chat template, with the request's template variables and the thinking
        switch; a conversation the template refuses is the client's error."""
        thinking = self.thinking(kwargs)
        if thinking and not self.template.has_thinking_switch:
            raise APIError(400, f"this model renders chats with {self.template.name}, which has no thinking mode; "
                           "send thinking: false, or serve the model with --chat-format v3.1 (DeepSeek-V3.1's)",
                           code="invalid_value", param="chat_template_kwargs.thinking")
        try:
            return self.template.render([{"role": m.role, "content": m.text()} for m in messages],
                                        add_generation_prompt=add_generation_prompt, thinking=thinking,
                                        template_kwargs=kwargs.others() if kwargs is not None else None)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    def check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.engine.model.config.vocab_size
        if not all(0 <= t < vocab for t in ids):
            raise APIError(400, f"invalid value for '{param}': token ids must lie in [0, {vocab})", param=param,
                           code="invalid_value")

    async def prompt(self, prompt: str | list[int], add_bos: bool) -> Prompt:
        if isinstance(prompt, str):
            mine = await self.encode(prompt, "prompt")
            ids = self.with_bos(mine) if add_bos else mine
            return Prompt(ids, len(ids) - len(mine), prompt)
        self.check_ids(prompt, "prompt")
        return Prompt(list(prompt), 0, await asyncio.to_thread(self.tokenizer.decode, prompt))

    async def completions(self, body: CompletionRequest, request: Request):
        prompts = [await self.prompt(p, body.add_special_tokens) for p in body.prompts()]
        max_tokens = self.config.default_max_tokens if body.max_tokens is None else body.max_tokens
        scored = body.echo and body.logprobs is not None
        handles = self.submit(body, [p.ids for p in prompts], max_tokens, "prompt", logprobs=body.logprobs,
                              prompt_logprobs=body.logprobs if scored else (0 if max_tokens == 0 else None))
        rid = "cmpl-" + uuid.uuid4().hex
        tok = self.tokenizer

        def chunk(choices: list[dict]) -> dict:
            return {"id": rid, "object": "text_completion", "created": int(time.time()),
                    "model": self.config.model_name, "choices": choices}

        def answer(i: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}

        def echoed(p: Prompt, seq: Sequence) -> tuple[list[int], list]:
            """The prompt tokens the client sent, with their entries, when echoing with logprobs."""
            return p.ids[p.echo_from :], seq.prompt_logprobs[p.echo_from :]

        if body.stream:
            offsets = [0] * len(prompts)

            def first(i: int) -> list[dict]:
                if not body.echo:
                    return []
                p, logprobs = prompts[i], None
                if scored:
                    logprobs = completion_logprobs(tok, *echoed(p, handles[i].seq))
                offsets[i] = len(p.text)
                return [chunk([answer(i, p.text, None, logprobs)])]

            def on_event(i: int, ev: Event) -> list[dict]:
                out = first(i) if ev.first else []
                if ev.text or ev.logprobs:
                    entries = self.visible(ev.logprobs, ev)
                    logprobs = None
                    if body.logprobs is not None:
                        logprobs = completion_logprobs(tok, [e.token for e in entries], entries, offsets[i])
                    offsets[i] += len(ev.text)
                    out.append(chunk([answer(i, ev.text, None, logprobs)]))
                if ev.finish_reason is not None:
                    out.append(chunk([answer(i, "", ev.finish_reason)]))
                return out

            return sse(handles, request, body, on_event, chunk_usage(rid, "text_completion",
                                                                              sum(len(p.ids) for p in prompts)))
        results = await collect_all(handles, request)
        choices = []
        for i, (p, h, (text, last)) in enumerate(zip(prompts, handles, results)):
            logprobs = None
            if body.logprobs is not None:
                ids, entries = echoed(p, h.seq) if body.echo else ([], [])
                generated = self.visible(h.seq.logprobs, last)
                logprobs = completion_logprobs(tok, ids + [e.token for e in generated], entries + generated)
            choices.append(answer(i, (p.text if body.echo else "") + text, last.finish_reason, logprobs))
        return {**chunk(choices), "usage": usage(sum(len(p.ids) for p in prompts), sum(r[1].n_tokens for r in results))}

    def visible(self, entries: list[TokenLogprob], ev: Event) -> list[TokenLogprob]:
        """The generated tokens whose log-probabilities an answer shows: all but a closing stop token, which is
        not part of the text."""
        if ev.finish_reason == "stop" and entries and entries[-1].token in self.stop_ids:
            return entries[:-1]
        return entries

    async def chat(self, body: ChatRequest, request: Request):
        prompt = await self.encode(self.render(body.messages, kwargs=body.chat_template_kwargs), "messages")
        # thinking mode: the text before </think> is answered as reasoning_content, the rest as content
        thinking = self.thinking(body.chat_template_kwargs) is True
        max_tokens = body.max_completion_tokens or body.max_tokens or max(self.engine.max_len - len(prompt), 1)
        top = (body.top_logprobs or 0) if body.logprobs else None
        [handle] = self.submit(body, [prompt], max_tokens, "messages", logprobs=top)
        rid = "chatcmpl-" + uuid.uuid4().hex
        tok = self.tokenizer

        def chunk(delta: dict, finish: str | None, logprobs: dict | None = None) -> dict:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            if body.logprobs:
                choice["logprobs"] = logprobs
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": self.config.model_name, "choices": [choice]}

        if body.stream and thinking:
            splitter = ReasoningSplitter()
            held: list[TokenLogprob] = []  # the entries of tokens whose text the splitter holds back

            def on_event(i: int, ev: Event) -> list[dict]:
                out = [chunk({"role": "assistant", "content": ""}, None)] if ev.first else []
                held.extend(self.visible(ev.logprobs, ev))
                deltas = reasoning_deltas(splitter, ev)
                if body.logprobs and held and not deltas and ev.finish_reason is not None:
                    deltas = [{}]  # the last tokens' entries, with no text left to carry them
                for j, delta in enumerate(deltas):  # the tokens' entries ride on the last text they made
                    logprobs = None
                    if body.logprobs and j == len(deltas) - 1:
                        logprobs = chat_logprobs(tok, held)
                        held.clear()
                    out.append(chunk(delta, None, logprobs))
                if ev.finish_reason is not None:
                    out.append(chunk({}, ev.finish_reason))
                return out

            return sse([handle], request, body, on_event, chunk_usage(rid, "chat.completion.chunk", len(prompt)))
        if body.stream:
            def on_event(i: int, ev: Event) -> list[dict]:
                out = [chunk({"role": "assistant", "content": ""}, None)] if ev.first else []
                if ev.text or ev.logprobs:
                    logprobs = chat_logprobs(tok, self.visible(ev.logprobs, ev)) if body.logprobs else None
                    out.append(chunk({"content": ev.text}, None, logprobs))
                if ev.finish_reason is not None:
                    out.append(chunk({}, ev.finish_reason))
                return out

            return sse([handle], request, body, on_event, chunk_usage(rid, "chat.completion.chunk", len(prompt)))
        [(text, last)] = await collect_all([handle], request)
        message = {"role": "assistant", "content": text}
        if thinking:
            reasoning, answer = split_reasoning(text)
            message = {"role": "assistant", "reasoning_content": reasoning, "content": answer}
        choice = {"index": 0, "message": message, "finish_reason": last.finish_reason}
        if body.logprobs:
            choice["logprobs"] = chat_logprobs(tok, self.visible(handle.seq.logprobs, last))
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.config.model_name,
                "choices": [choice], "usage": usage(len(prompt), last.n_tokens)}

    def check_model(self, model: str | None) -> None:
        name = self.config.model_name
        if model is not None and model != name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{name}'",
                           code="model_not_found", param="model")

    def submit(self, body: SamplingFields, prompts: list[list[int]], max_tokens: int, prompt_param: str,
               logprobs: int | None = None, prompt_logprobs: int | None = None) -> list[Handle]:
        """Queue one sequence per prompt, all or none."""
        self.check_model(body.model)
        max_len = self.engine.max_len
        for prompt in prompts:
            if len(prompt) + max_tokens > max_len:
                raise APIError(400, f"this model's context holds {max_len} tokens, but the prompt has "
                               f"{len(prompt)} and {max_tokens} more were requested; shorten the prompt or lower "
                               "max_tokens", code="context_length_exceeded", param=prompt_param)
        try:
            params = SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature,
                                    top_k=max(body.top_k, 0), top_p=body.top_p, seed=body.seed,
                                    stop_token_ids=self.stop_ids, stop=body.stop_strings(), logprobs=logprobs,
                                    prompt_logprobs=prompt_logprobs)
        except InvalidValue as e:  # the protocol's own checks should have caught it: still the client's value
            raise APIError(400, f"invalid value for '{e.field}': {e.value!r} {e.why}", code="invalid_value",
                           param=e.field) from None
        handles = []
        try:
            for prompt in prompts:
                handles.append(self.batcher.submit(prompt, params))
        except QueueFull as e:
            for h in handles:
                self.batcher.cancel(h)
            raise APIError(429, f"the server is busy: {e}; retry later", type="rate_limit_error",
                           code="queue_full") from None
        return handles


@dataclass
class Prompt:
    """One prompt of a completions request: what the model reads, and what the client sent."""

    ids: list[int]
    echo_from: int  # ids[echo_from:] are the client's own tokens: 1 when the server put BOS before its text
    text: str  # the client's prompt as text, what `echo` returns


def reasoning_deltas(splitter: ReasoningSplitter, ev: Event) -> list[dict]:
    """The chat deltas of one event's text in thinking mode: reasoning_content first, then content, each only
    when there is some (the splitter may hold back the start of a marker until the next event)."""
    reasoning, answer = splitter.feed(ev.text)
    if ev.finish_reason is not None:
        rest_reasoning, rest_answer = splitter.finish()
        reasoning, answer = reasoning + rest_reasoning, answer + rest_answer
    return [{key: text} for key, text in (("reasoning_content", reasoning), ("content", answer)) if text]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk_usage(rid: str, obj: str, prompt_tokens: int):

    def make(completion_tokens: int, model: str) -> dict:
        return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
                "usage": usage(prompt_tokens, completion_tokens)}

    return make


async def merged(handles: list[Handle], batcher: Batcher) -> AsyncIterator[tuple[int, Event]]:
    """(index, event) of every request until each has sent its last one, as they come; the first event of
    each request is marked `first`. Cancels what is still running if the consumer stops early."""
    waiting = {asyncio.ensure_future(h.events.get()): i for i, h in enumerate(handles)}
    started = set()
    try:
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for get in sorted(done, key=waiting.get):
                i = waiting.pop(get)
                ev = get.result()
                ev.first = i not in started
                started.add(i)
                yield i, ev
                if ev.finish_reason is None and ev.error is None:
                    waiting[asyncio.ensure_future(handles[i].events.get())] = i
    finally:
        for get in waiting:
            get.cancel()
        for h in handles:
            batcher.cancel(h)


async def collect_all(handles: list[Handle], request: Request) -> list[tuple[str, Event]]:
    """The whole text and last event of each request, cancelling them all if the client disconnects or one
    fails."""
    batcher = request.app.state.batcher
    parts: list[list[str]] = [[] for _ in handles]
    last: list[Event | None] = [None] * len(handles)
    stream = merged(handles, batcher)
    try:
        while True:
            step = asyncio.ensure_future(anext(stream))
            while not step.done():
                await asyncio.wait({step}, timeout=DISCONNECT_POLL_S)
                if not step.done() and await request.is_disconnected():
                    step.cancel()  # nobody will read the answer; 499 is nginx's "client closed request"
                    raise APIError(499, "the client closed the request", code="client_closed")
            try:
                i, ev = step.result()
            except StopAsyncIteration:
                return [("".join(p), e) for p, e in zip(parts, last)]
            if ev.error is not None:
                raise APIError(503, ev.error, type="server_error", code="engine_error")
            parts[i].append(ev.text)
            last[i] = ev
    finally:
        await stream.aclose()


def sse(handles: list[Handle], request: Request, body: SamplingFields, on_event, usage_chunk):
    """A server-sent-event stream of OpenAI chunks, `on_event(index, event)` giving each event's; the client
    leaving ends the generator, which cancels."""
    batcher = request.app.state.batcher
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    def data(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream():
        completion_tokens = 0
        async for i, ev in merged(handles, batcher):
            if ev.error is not None:
                yield data(APIError(503, ev.error, type="server_error", code="engine_error").body())
                break
            for c in on_event(i, ev):
                yield data(c)
            if ev.finish_reason is not None:
                completion_tokens += ev.n_tokens
        else:
            if include_usage:
                yield data(usage_chunk(completion_tokens, body.model))
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
