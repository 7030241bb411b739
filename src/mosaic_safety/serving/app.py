"""The FastAPI application: OpenAI-compatible endpoints whose every request carries its own policy.

Policy of a request = its API key's floor ∪ the profile it names (``"model": "<id>:<profile>"`` or
``"safety": {"profile": ...}``) ∪ explicit ``"safety": {"categories": [...]}``. Responses carry a
``safety`` object with the applied policy and, when the model refused, the category whose rule
fired (``unknown`` when the refusal matches no active template), plus an ``X-Mosaic-Policy`` header.

Errors are OpenAI-shaped JSON (``{"error": {"message", "type", "param", "code"}}``): 400 for bad
input (malformed JSON included), 401 for a missing or unknown key, 404 for an unknown model, 413 for
an oversized body, 429 when the concurrency limit is reached, 504 on timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..controlled import GenerationError, Prompt
from ..methods.base import Method, MethodError
from ..policy import Policy
from . import ServeError
from .engine import Engine, Job, Sampling
from .metrics import Metrics
from .middleware import CLIENT_CLOSED, BodyLimit, MetricsMiddleware
from .profiles import ApiKey, ProfileBook, ResolvedPolicy
from .refusal import RefusalAttributor
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest

log = logging.getLogger("mosaic.serve")

ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/safety", "/health", "/metrics"}


@dataclass
class ServeSettings:
    """Server limits; every one is a CLI option of ``mosaic serve``."""

    model_id: str = "mosaic"
    max_new_tokens: int = 512  # hard cap on max_tokens
    default_max_tokens: int = 128  # when the request gives none
    max_prompt_tokens: int = 2048
    max_body_bytes: int = 1_000_000
    request_timeout_s: float = 120.0
    max_concurrency: int = 64  # admitted generation requests; beyond this: 429
    max_batch_size: int = 8
    max_wait_ms: float = 10.0


@dataclass
class _Prepared:
    prompts: list[Prompt]
    ctrl: list[Policy]
    resolved: ResolvedPolicy
    sampling: Sampling
    stop: list[str]
    prompt_tokens: list[int]


class Server:
    """State shared by the handlers: the method, its engine, the profiles and the counters."""

    def __init__(
        self, method: Method, book: ProfileBook | None = None, settings: ServeSettings | None = None
    ):
        model = getattr(method, "model", None)
        if model is None or not hasattr(method, "rewrite"):
            raise MethodError(f"method {method.name!r} cannot be served: it has no controlled model")
        self.method = method
        self.settings = settings or ServeSettings()
        self.registry = method.registry
        self.book = book or ProfileBook.open(self.registry)
        if self.book.registry.name != self.registry.name or self.book.registry.names != self.registry.names:
            raise MethodError("the profiles file and the served model use different category registries")
        self.metrics = Metrics()
        self.engine = Engine(
            model, self.settings.max_batch_size, self.settings.max_wait_ms, metrics=self.metrics
        )
        # the LoRA baselines answer the empty policy with the untouched base model (as their
        # generate() does): those requests go to an engine of their own over it
        base = getattr(method, "base", None) if getattr(method, "empty_to_base", False) else None
        self.base_engine = (
            Engine(base, self.settings.max_batch_size, self.settings.max_wait_ms, metrics=self.metrics)
            if base is not None
            else None
        )
        self.engines = [self.engine] + ([self.base_engine] if self.base_engine is not None else [])
        self.attributor = RefusalAttributor(self.registry)
        self.admitted = 0
        tokenizer = model.tokenizer
        marks = set(tokenizer.all_special_tokens) | {
            t.content for t in tokenizer.added_tokens_decoder.values() if t.special
        }
        self.special_marks = sorted((m for m in marks if m), key=len, reverse=True)

    def check_plain_text(self, texts: list[str], param: str) -> None:
        """Client text must not carry the template's special tokens: the tokenizer would read
        ``<|im_end|><|im_start|>system`` typed into a message as a real end of turn and a real
        system turn, so a caller could forge turns around the policy (tiktoken refuses such text
        by default too)."""
        for i, text in enumerate(texts):
            found = next((m for m in self.special_marks if m in text), None)
            if found is not None:
                where = f"{param}[{i}]" if len(texts) > 1 or param == "messages" else param
                raise ServeError(
                    400,
                    f"{where} contains the model's special token {found!r}; special tokens cannot be sent as text",
                    param=param,
                )

    def engine_for(self, policy: Policy) -> Engine:
        """The engine that answers a request made under ``policy`` (before any rewrite)."""
        return self.base_engine if self.base_engine is not None and not policy else self.engine

    # -- request preparation ------------------------------------------------------------------
    def _model_profile(self, model: str) -> str | None:
        own = self.settings.model_id
        # the served id may itself hold a colon ("smollm2:135m"): the profile is what follows it
        base, sep, profile = (
            (own, ":", model[len(own) + 1 :]) if model.startswith(own + ":") else (model, "", "")
        )
        if base != own:
            raise ServeError(
                404,
                f"model {model!r} does not exist; this server serves {self.settings.model_id!r} "
                f"(optionally '{self.settings.model_id}:<profile>')",
                "model_not_found",
                "model",
            )
        if sep and not profile:
            raise ServeError(400, "empty profile after ':' in the model name", param="model")
        return profile if sep else None

    def prepare(
        self, key: ApiKey | None, req: ChatCompletionRequest | CompletionRequest, prompts: list[Prompt]
    ) -> _Prepared:
        s = self.settings
        profile = self._model_profile(req.model)
        safety = req.safety
        if safety is not None and safety.profile is not None:
            if profile is not None and profile != safety.profile:
                raise ServeError(
                    400,
                    f"conflicting profiles: {profile!r} in the model name, {safety.profile!r} in safety.profile",
                    param="safety.profile",
                )
            profile = safety.profile
        resolved = self.book.resolve(key, profile, safety.categories if safety else None)
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        budget = _budget_field(req)
        max_tokens = asked or min(s.default_max_tokens, s.max_new_tokens)
        if max_tokens > s.max_new_tokens:
            raise ServeError(
                400,
                f"{budget} {max_tokens} exceeds this server's limit of {s.max_new_tokens}",
                param=budget,
            )
        min_tokens = req.min_tokens or 0
        if min_tokens > max_tokens:
            raise ServeError(400, f"min_tokens cannot exceed {budget}", param="min_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not x for x in stop):
            raise ServeError(400, "stop takes up to 4 non-empty strings", param="stop")
        sampling = Sampling(
            max_new_tokens=max_tokens,
            min_tokens=min_tokens,
            # T -> 0 is argmax; below 1e-5 a float32 division would underflow to 0/0
            # top_p 0 keeps only the likeliest token (OpenAI allows it): greedy
            temperature=req.temperature
            if req.temperature and req.temperature >= 1e-5 and req.top_p != 0
            else 0.0,
            top_p=req.top_p if req.top_p else 1.0,
            seed=None if req.seed is None else req.seed % 2**63,
        )
        inputs, ctrl, counts = [], [], []
        for prompt in prompts:
            model_prompt, policy = self._rewrite(prompt, resolved.policy)
            try:
                n = self.engine.prompt_tokens(model_prompt, policy)
            except Exception as exc:  # a chat template rejecting the conversation is the caller's input
                raise ServeError(400, f"cannot template these messages: {exc}", param="messages") from None
            if n > s.max_prompt_tokens:
                raise ServeError(
                    400,
                    f"prompt is {n} tokens; this server's limit is {s.max_prompt_tokens}",
                    param="messages",
                )
            try:  # checked here, per request: past the window a row would fail its whole batch
                self.engine.model.check_fits(n, max_tokens)
            except GenerationError as exc:
                raise ServeError(400, str(exc), param=budget) from None
            inputs.append(model_prompt)
            ctrl.append(policy)
            counts.append(n)
        return _Prepared(inputs, ctrl, resolved, sampling, stop, counts)

    def _rewrite(self, prompt: Prompt, policy: Policy) -> tuple[Prompt, Policy]:
        """Apply the method's (prompt, policy) rewrite to a string or a whole conversation.

        Rewrites are defined on one user message; for a conversation the rewrite of its last user
        message tells us what to add (e.g. the in-context baseline's system rules).
        """
        rewrite = self.method.rewrite
        if isinstance(prompt, str):
            return rewrite(prompt, policy)
        users = [m["content"] for m in prompt if m["role"] == "user"]
        out, ctrl = rewrite(users[-1] if users else "", policy)
        if isinstance(out, str):
            return list(prompt), ctrl
        added = [dict(m) for m in out[:-1]]
        if not added:
            return list(prompt), ctrl
        # the in-context rules come first and the client's own system text follows them; a trained
        # method's system text (topics, magic tokens) stays exactly as it was trained
        own = [m["content"] for m in prompt if m["role"] == "system"]
        if own and added[-1]["role"] == "system" and self.method.merges_client_system:
            added[-1]["content"] = "\n\n".join([added[-1]["content"], *own])
        return added + [m for m in prompt if m["role"] != "system"], ctrl

    def admit(self) -> None:
        if self.admitted >= self.settings.max_concurrency:
            raise ServeError(
                429,
                f"too many concurrent requests (limit {self.settings.max_concurrency}); retry shortly",
                "rate_limit_error",
            )
        self.admitted += 1
        self.metrics.flight(1)

    def release(self) -> None:
        self.admitted -= 1
        self.metrics.flight(-1)

    def safety_report(self, resolved: ResolvedPolicy, text: str | None) -> dict[str, Any]:
        report = resolved.describe()
        if text is not None:
            rule = self.attributor.attribute(text, resolved.policy)
            report["refused"] = rule is not None
            report["rule"] = rule
            if rule is not None:
                report["refusal_text"] = self.registry[rule].refusal_text if rule in self.registry else None
        return report


class _Generation:
    """One prompt's generation: turns token events into text deltas, applying stop strings and the
    method's scrub (magic tokens are never shown)."""

    def __init__(self, server: Server, job: Job, stop: list[str]):
        self.server, self.job, self.stop = server, job, stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish: str | None = None
        # text not yet sent while it could still become a stop string or a secret to scrub
        self.hold = max([len(x) for x in stop] + [server.method.scrub_span], default=1) - 1
        self.held = bool(stop) or server.method.scrub_span > 0

    async def deltas(self, deadline: float) -> AsyncIterator[str]:
        while self.finish is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise asyncio.TimeoutError
            kind, value = await asyncio.wait_for(self.job.events.get(), remaining)
            if kind == "error":
                raise RuntimeError(value)
            if kind == "done":
                self.finish = "length" if value == "length" else "stop"
                if self.ids:  # flush a trailing incomplete UTF-8 sequence, as generate() does
                    text = self._decode()
                    self.text = self._cut(text)
                    if len(self.text) < len(text):  # a stop string that only this flush shows
                        self.finish = "stop"
                break
            self.ids.append(value)
            text = self._decode()
            if text.endswith("\ufffd"):  # incomplete UTF-8: wait for the next token
                continue
            self.text = self._cut(text)
            if len(self.text) < len(text):  # a stop string: end here
                self.finish = "stop"
                self.job.cancelled.set()
                break
            safe = len(text) - self.hold if self.held else len(text)
            if safe > self.emitted:
                yield text[self.emitted : safe]
                self.emitted = safe
        if len(self.text) > self.emitted:
            yield self.text[self.emitted :]
            self.emitted = len(self.text)

    def _decode(self) -> str:
        return self.server.method.scrub([self.server.engine.decode(self.ids)])[0]

    def _cut(self, text: str) -> str:
        cut = min((i for i in (text.find(x) for x in self.stop) if i >= 0), default=-1)
        return text[:cut] if cut >= 0 else text


async def _cancel_on_disconnect(request: Request, jobs: list[Job], every_s: float = 0.25) -> None:
    """Cancel the request's rows once its client has gone (the task then ends by itself)."""
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)
    for job in jobs:
        job.cancelled.set()
        # a row still queued behind a running batch hears its "done" from the worker only once that
        # batch ends: end the handler's wait now, or a gone client holds a concurrency slot until then
        job.events.put_nowait(("done", "cancelled"))


def _error(exc: ServeError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def create_app(server: Server) -> FastAPI:
    """The ASGI app; the engine thread starts and stops with the app's lifespan."""
    settings = server.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for engine in server.engines:
            engine.start()
        try:
            yield
        finally:  # uvicorn has already drained in-flight requests when we get here
            for engine in server.engines:
                await asyncio.to_thread(engine.stop)

    app = FastAPI(
        title="MOSAIC safety server",
        version="1",
        description="OpenAI-compatible generation with per-request safety policies (MOSAIC control tokens).",
        lifespan=lifespan,
    )
    bearer = HTTPBearer(auto_error=False, description="API key from the profiles file")

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI parses the body before dependencies run: a caller without a valid key learns
        # nothing about what the server accepts, whatever the body
        try:
            server.book.authenticate(request.headers.get("authorization"))
        except ServeError as denied:
            return _error(denied)
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", "")
            message = f"malformed JSON body: {detail}".rstrip(": ")
        else:
            loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
            message = f"{loc or 'body'}: {first.get('msg', 'invalid request')}"
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more problems)"
        return _error(ServeError(400, message, param=None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(ServeError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(ServeError(500, f"internal error: {type(exc).__name__}", "server_error"))

    def authenticate(request: Request, _: Any = Depends(bearer)) -> ApiKey | None:
        """A dependency; a body that fails validation is answered after this check too (``_invalid``)."""
        return server.book.authenticate(request.headers.get("authorization"))

    responses = {
        400: {"description": "Invalid request"},
        401: {"description": "Missing or invalid API key"},
        404: {"description": "Unknown model"},
        413: {"description": "Body too large"},
        429: {"description": "Too many concurrent requests"},
        504: {"description": "Timed out"},
    }

    @app.get("/health", tags=["ops"])
    async def health() -> JSONResponse:
        alive = all(engine.alive for engine in server.engines)
        body = {
            "status": "ok" if alive else "unavailable",
            "model": settings.model_id,
            "method": server.method.name,
            "in_flight": server.admitted,
            "batches": sum(engine.batches for engine in server.engines),
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    def model_ids() -> list[str]:
        return [settings.model_id] + [f"{settings.model_id}:{p}" for p in server.book.profiles]

    @app.get("/v1/models", responses=responses)
    async def models(key: ApiKey | None = Depends(authenticate)) -> dict[str, Any]:
        created = int(time.time())
        return {"object": "list", "data": [_model_card(i, created) for i in model_ids()]}

    @app.get("/v1/models/{model_id:path}", responses=responses)
    async def retrieve_model(model_id: str, key: ApiKey | None = Depends(authenticate)) -> dict[str, Any]:
        """One listed id (the openai client's ``models.retrieve``); the id may hold colons and slashes."""
        if model_id not in model_ids():
            raise ServeError(
                404,
                f"model {model_id!r} does not exist; GET /v1/models lists the served ids",
                "model_not_found",
                "model",
            )
        return _model_card(model_id, int(time.time()))

    @app.get("/v1/safety", responses=responses)
    async def safety(key: ApiKey | None = Depends(authenticate)) -> dict[str, Any]:
        """Categories, profiles and the caller's floor (used by the playground)."""
        body = server.book.describe()
        body["model"] = settings.model_id
        body["key"] = {"name": key.name, "profile": key.profile, "floor": list(key.floor)} if key else None
        return body

    async def run(
        prep: _Prepared, stream: bool, include_usage: bool, chat: bool, model_name: str, request: Request
    ) -> Any:
        loop = asyncio.get_running_loop()
        jobs = []
        server.admit()
        try:
            for prompt, policy in zip(prep.prompts, prep.ctrl):
                job = Job(prompt, policy, prep.sampling, loop, asyncio.Queue())
                server.engine_for(prep.resolved.policy).submit(job)
                jobs.append(job)
        except RuntimeError:
            server.release()
            raise ServeError(503, "the server is shutting down", "server_error") from None
        server.metrics.policy(",".join(prep.resolved.policy))
        gens = [_Generation(server, job, prep.stop) for job in jobs]
        deadline = time.monotonic() + settings.request_timeout_s
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        headers = {"X-Mosaic-Policy": ",".join(prep.resolved.policy) or "(none)"}
        if stream:
            return StreamingResponse(
                _stream(server, prep, gens, deadline, rid, chat, model_name, include_usage),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        # a client that hangs up frees its rows at once, not after max_tokens of decoding for nobody
        # (a stream notices when its next write fails)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, jobs))
        try:
            for gen in gens:
                async for _ in gen.deltas(deadline):
                    pass
        except asyncio.TimeoutError:
            _count_work(server, prep, gens)
            raise ServeError(
                504, f"request timed out after {settings.request_timeout_s:g}s", "timeout"
            ) from None
        except RuntimeError as exc:
            _count_work(server, prep, gens)
            raise ServeError(500, str(exc), "server_error") from None
        finally:
            watcher.cancel()
            for job in jobs:
                job.cancelled.set()
            server.release()
        if watcher.done() and not watcher.cancelled():  # nobody is listening: no answer to build
            _count_work(server, prep, gens)
            return Response(status_code=CLIENT_CLOSED)
        choices, completion = [], 0
        for i, gen in enumerate(gens):
            completion += len(gen.ids)
            if chat:
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": gen.text},
                        "finish_reason": gen.finish,
                        "logprobs": None,
                    }
                )
            else:
                choices.append({"index": i, "text": gen.text, "finish_reason": gen.finish, "logprobs": None})
        report = server.safety_report(prep.resolved, gens[0].text)
        if len(gens) > 1:
            report["per_choice"] = [server.safety_report(prep.resolved, g.text)["rule"] for g in gens]
        _count(server, prep, gens)
        body = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": sum(prep.prompt_tokens),
                "completion_tokens": completion,
                "total_tokens": sum(prep.prompt_tokens) + completion,
            },
            "safety": report,
        }
        return JSONResponse(body, headers=headers)

    @app.post("/v1/chat/completions", responses=responses)
    async def chat_completions(
        request: Request, body: ChatCompletionRequest, key: ApiKey | None = Depends(authenticate)
    ) -> Any:
        messages = [_message(m) for m in body.messages]
        if not any(m["role"] == "user" for m in messages):
            raise ServeError(400, "messages need at least one 'user' message", param="messages")
        server.check_plain_text([m["content"] for m in messages], "messages")
        prep = server.prepare(key, body, [messages])
        return await run(prep, bool(body.stream), _usage(body), True, body.model, request)

    @app.post("/v1/completions", responses=responses)
    async def completions(
        request: Request, body: CompletionRequest, key: ApiKey | None = Depends(authenticate)
    ) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts or len(prompts) > settings.max_batch_size:
            raise ServeError(400, f"prompt takes 1 to {settings.max_batch_size} strings", param="prompt")
        if body.stream and len(prompts) > 1:
            raise ServeError(400, "streaming takes a single prompt", param="prompt")
        server.check_plain_text(prompts, "prompt")
        prep = server.prepare(key, body, list(prompts))
        return await run(prep, bool(body.stream), _usage(body), False, body.model, request)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/playground")

    @app.get("/playground", include_in_schema=False)
    async def playground() -> HTMLResponse:
        from .playground import PAGE

        return HTMLResponse(PAGE)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=server.metrics, routes=ROUTES | {"/playground", "/"})
    app.state.server = server
    return app


def _budget_field(req: ChatCompletionRequest | CompletionRequest) -> str:
    """The field that set the token budget, for errors to name: a caller of the openai client may
    only have sent ``max_completion_tokens`` (it deprecates ``max_tokens`` for chat), which wins
    when both are sent."""
    return "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"


def _model_card(model_id: str, created: int) -> dict[str, Any]:
    """A model object in OpenAI's shape (``id``, ``object``, ``created``, ``owned_by``), the same
    whether listed or retrieved."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "mosaic"}


def _usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _message(m: ChatMessage) -> dict[str, str]:
    role = "system" if m.role == "developer" else m.role
    return {"role": role, "content": m.text()}


def _count_work(server: Server, prep: _Prepared, gens: list[_Generation]) -> None:
    """Tokens processed, whether or not anyone received the answer."""
    server.metrics.tokens(sum(prep.prompt_tokens), sum(len(g.ids) for g in gens))


def _count(server: Server, prep: _Prepared, gens: list[_Generation]) -> None:
    _count_work(server, prep, gens)
    for gen in gens:
        rule = server.attributor.attribute(gen.text, prep.resolved.policy)
        if rule is not None:
            server.metrics.refusal(rule)


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


async def _stream(
    server: Server,
    prep: _Prepared,
    gens: list[_Generation],
    deadline: float,
    rid: str,
    chat: bool,
    model_name: str,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    gen = gens[0]
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, **extra: Any) -> dict[str, Any]:
        if chat:
            d: dict[str, Any] = {} if delta is None else {"content": delta}
            choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model_name,
            "choices": [choice],
            **extra,
        }

    counted = False
    try:
        first = chunk("", None, safety=server.safety_report(prep.resolved, None))
        if chat:
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        yield _sse(first)
        try:
            async for piece in gen.deltas(deadline):
                yield _sse(chunk(piece, None))
        except asyncio.TimeoutError:
            error = ServeError(
                504, f"request timed out after {server.settings.request_timeout_s:g}s", "timeout"
            )
        except RuntimeError as exc:
            error = ServeError(500, str(exc), "server_error")
        else:
            error = None
        if error is not None:
            server.metrics.stream_error("/v1/chat/completions" if chat else "/v1/completions", error.status)
            yield _sse(error.body())
            return
        _count(server, prep, gens)
        counted = True
        yield _sse(chunk(None, gen.finish, safety=server.safety_report(prep.resolved, gen.text)))
        if include_usage:
            usage = {
                "prompt_tokens": sum(prep.prompt_tokens),
                "completion_tokens": len(gen.ids),
                "total_tokens": sum(prep.prompt_tokens) + len(gen.ids),
            }
            yield _sse(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": model_name,
                    "choices": [],
                    "usage": usage,
                }
            )
        yield b"data: [DONE]\n\n"
    finally:
        gen.job.cancelled.set()
        if not counted:  # timed out, failed or hung up: the tokens were still computed
            _count_work(server, prep, gens)
        server.release()
