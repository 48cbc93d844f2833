"""`jaxpatience serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the live slot engine.

    jaxpatience serve --model CKPT [--adapter DIR] [--slots 16] [--port 8000] [--api-key KEY]
    GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream: server-sent events)

Each request becomes one engine Job per prompt (live.py); the engine thread calls back with Deltas, which
reach the request's asyncio queue through `call_soon_threadsafe`. A streamed request sends them on as OpenAI
chunks; a plain one gathers them. A client that goes away cancels its jobs, and the engine frees their slots at its
next look. With `echo` or top log-probs (lm-evaluation-harness's loglikelihood requests: `echo`, `logprobs: 1`,
`max_tokens` 1 or 0) every choice's prompt + completion is then scored in one forward pass (LiveEngine.score);
`max_tokens: 0` generates nothing. wire.py checks the fields and shapes the bodies; this file only moves them.

Hostile input meets one door: `_Door`, the outermost layer of the app, writes one access-log line per request
(client, method, path, status, prompt + completion tokens, seconds; never a header, so never the key) and turns
whatever else goes wrong into an OpenAI-shaped 500 and one log line, never a traceback; a client that leaves
mid-body is a 499 line. The body is read with a size limit (MAX_BODY_BYTES, before it is parsed), then checked
as a whole by wire.check_body before anything is tokenized. The port is bound before the model is loaded, so a
port in use or a host that does not resolve is one sentence (exit 2), and `--port 0` announces the port it got.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from jaxpatience import sharding
from jaxpatience.config import ConfigError, MeshConfig, ServeConfig, command_parser, config_from_args
from jaxpatience.model import lora
from jaxpatience.model.weights import load_pretrained
from jaxpatience.serving import wire
from jaxpatience.serving.live import Delta, EngineFailed, Job, LiveEngine, QueueFull
from jaxpatience.serving.wire import ApiError

MAX_BODY_BYTES = 64 << 20  # a request body; past it the request is refused while it arrives
USAGE = "jaxpatience.usage"  # the ASGI scope's key for (prompt tokens, completion tokens), for the access log


class _Request:
    """One HTTP request's jobs and the queue their Deltas arrive on (as (prompt index, Delta))."""

    def __init__(self, engine: LiveEngine, settings: wire.Settings):
        self.engine, self.settings = engine, settings
        self.events: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        post = lambda prompt: lambda delta: loop.call_soon_threadsafe(self.events.put_nowait, (prompt, delta))
        self.jobs = [
            Job(
                prompt_ids=ids,
                emit=post(i),
                n=settings.n,
                max_tokens=settings.max_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
                seed=settings.seed,
                seed_index=i,
                stop_ids=settings.stop_ids,
                stop_strings=settings.stop_strings,
            )
            for i, ids in enumerate(settings.prompt_ids)
        ]
        self.unfinished = len(self.jobs) * settings.n if settings.max_tokens else 0

    def submit(self) -> None:
        if not self.settings.max_tokens:  # max_tokens 0: nothing to generate (echo scores the prompt alone)
            return
        try:
            for job in self.jobs:
                self.engine.submit(job)
        except QueueFull as err:
            self.cancel()
            raise ApiError(429, f"the server is busy ({err}); retry shortly.", kind="rate_limit_error") from None
        except EngineFailed as err:
            self.cancel()
            raise ApiError(503, f"the engine stopped on an error: {err}", kind="server_error") from None

    def cancel(self) -> None:
        for job in self.jobs:
            self.engine.cancel(job)

    async def next(self) -> tuple[int, Delta]:
        """The next Delta as (choice index, Delta); an engine failure raises ApiError 500."""
        prompt, delta = await self.events.get()
        if delta.error is not None:
            raise ApiError(500, f"generation failed: {delta.error}", kind="server_error")
        if delta.finish_reason is not None:
            self.unfinished -= 1
        return prompt * self.settings.n + delta.sample, delta


async def _until_disconnected(request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)


async def _collect(http_request, request: _Request, tokenizer, *, chat: bool, model: str) -> dict | None:
    """Gather every choice; None when the client left first (its jobs are cancelled)."""
    count = len(request.jobs) * request.settings.n
    texts, ids, logprobs, reasons = [""] * count, [[] for _ in range(count)], [[] for _ in range(count)], [None] * count
    watch = asyncio.ensure_future(_until_disconnected(http_request))
    try:
        while request.unfinished:
            get = asyncio.ensure_future(request.next())
            await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                return None
            index, delta = get.result()
            texts[index] += delta.text
            ids[index] += delta.token_ids
            logprobs[index] += delta.logprobs
            reasons[index] = delta.finish_reason or reasons[index]
    finally:
        watch.cancel()
        if request.unfinished:
            request.cancel()
    reasons = [reason or "length" for reason in reasons]  # max_tokens 0: nothing was generated
    bodies = await _logprobs_bodies(request, tokenizer, ids, logprobs, chat=chat)
    if request.settings.echo:
        prompts = [tokenizer.decode(prompt) for prompt in request.settings.prompt_ids]
        texts = [prompts[i // request.settings.n] + text for i, text in enumerate(texts)]
    choices = [wire.choice_body(i, texts[i], reasons[i], bodies[i], chat=chat, stream=False) for i in range(count)]
    prompt_tokens = sum(map(len, request.settings.prompt_ids))
    http_request.scope[USAGE] = (prompt_tokens, sum(map(len, ids)))
    return wire.response_body(
        wire.new_id(chat),
        model,
        choices,
        chat=chat,
        stream=False,
        usage_body=wire.usage(prompt_tokens, sum(map(len, ids))),
    )


async def _logprobs_bodies(request: _Request, tokenizer, ids: list[list[int]], logprobs: list[list[float]], *,
                           chat: bool) -> list[dict | None]:  # fmt: skip
    """Each choice's logprobs body: the engine's chosen-token log-probs, or with echo / top alternatives, those of
    one forward pass over prompt + completion (the prompt's tokens included with echo, its first one as None)."""
    settings = request.settings
    if not settings.logprobs:
        return [None] * len(ids)
    if not (settings.echo or settings.top_logprobs):
        return [
            wire.logprobs_body(tokenizer, choice, lps, chat=chat) for choice, lps in zip(ids, logprobs, strict=True)
        ]
    prompts = [settings.prompt_ids[i // settings.n] for i in range(len(ids))]
    sequences = [prompt + choice for prompt, choice in zip(prompts, ids, strict=True)]
    scored = await asyncio.to_thread(request.engine.score, sequences, settings.top_logprobs)
    bodies = []
    for prompt, sequence, (chosen, alternatives) in zip(prompts, sequences, scored, strict=True):
        top = [None, *alternatives] if settings.top_logprobs else None
        lps: list[float | None] = [None, *chosen]
        skip = 0 if settings.echo else len(prompt)  # without echo: the completion's tokens only
        bodies.append(
            wire.logprobs_body(tokenizer, sequence[skip:], lps[skip:], chat=chat, top=top[skip:] if top else None)
        )
    return bodies


async def _stream(request: _Request, tokenizer, *, chat: bool, model: str, scope: dict) -> AsyncIterator[str]:
    """Server-sent events: one chunk per Delta, then (if asked) a usage chunk, then `data: [DONE]`."""
    request_id, count = wire.new_id(chat), len(request.jobs) * request.settings.n
    started, offsets, completion_tokens = [False] * count, [0] * count, 0
    send = lambda body: f"data: {json.dumps(body)}\n\n"
    try:
        while request.unfinished:
            try:
                index, delta = await request.next()
            except ApiError as err:
                yield send(err.body())
                break
            lp = None
            if request.settings.logprobs:
                lp = wire.logprobs_body(tokenizer, delta.token_ids, delta.logprobs, chat=chat, offset=offsets[index])
            choice = wire.choice_body(
                index, delta.text, delta.finish_reason, lp, chat=chat, stream=True, first=not started[index]
            )
            started[index], offsets[index] = True, offsets[index] + len(delta.text)
            completion_tokens += len(delta.token_ids)
            scope[USAGE] = (sum(map(len, request.settings.prompt_ids)), completion_tokens)
            yield send(wire.response_body(request_id, model, [choice], chat=chat, stream=True, usage_body=None))
        if request.settings.include_usage:
            usage = wire.usage(sum(map(len, request.settings.prompt_ids)), completion_tokens)
            yield send(wire.response_body(request_id, model, [], chat=chat, stream=True, usage_body=usage))
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects (the response task is cancelled): free the slots
        if request.unfinished:
            request.cancel()


async def _api_error(_, err: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 429 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:  # unknown path, wrong method
    message = f"{request.method} {request.url.path}: {err.detail}"
    return JSONResponse(ApiError(err.status_code, message).body(), status_code=err.status_code)


class _Door:
    """The outermost ASGI layer: one access-log line per request, and no exception past it (see the top)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        note = ""
        try:
            await self.app(scope, receive, sending)
        except ClientDisconnect:  # left while sending its body: nobody to answer
            status[0], note = 499, " (the client left while sending its body)"
        except Exception as err:  # a bug: the client gets a 500 in OpenAI's shape, the log one line
            note = f" ({type(err).__name__}: {_first_line(err)})"
            if not status[0]:
                status[0] = 500
                body = ApiError(
                    500, f"internal error ({type(err).__name__}); see the server's log.", kind="server_error"
                )
                await JSONResponse(body.body(), status_code=500)(scope, receive, send)
        finally:
            usage = scope.get(USAGE)
            tokens = f"{usage[0]}+{usage[1]} tokens" if usage else "- tokens"
            client = scope.get("client") or ("-", 0)
            path = repr(scope.get("path", ""))[1:-1][:200]  # control characters and surrogates escaped
            print(f'{client[0]}:{client[1]} "{scope.get("method")} {path}" {status[0] or 499} {tokens} '
                  f"{time.perf_counter() - start:.3f}s{note}", flush=True)  # fmt: skip


def _first_line(err: BaseException) -> str:
    text = repr(str(err))[1:-1]
    return text.splitlines()[0][:200] if text else "no message"


async def _read_body(request: Request) -> bytes:
    """The request's body, refused (400) as soon as it is longer than MAX_BODY_BYTES; ClientDisconnect when the
    client leaves first."""
    too_long = ApiError(400, f"the request body is longer than {MAX_BODY_BYTES >> 20} MiB.")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_long
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_long
    return bytes(body)


def _read_request(raw: bytes, chat: bool, engine: LiveEngine, tokenizer, model_name: str,
                  max_chars: int | None = None) -> wire.Settings:  # fmt: skip
    """A request body checked and tokenized (wire.py), against this engine's limits."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit integer
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    body = wire.check_body(body, model_name, chat=chat)
    prompt_ids = (wire.chat_prompt if chat else wire.completion_prompts)(body, tokenizer, max_chars)
    return wire.sampling_settings(
        body,
        prompt_ids,
        tokenizer,
        chat=chat,
        max_model_len=engine.max_model_len,
        max_n=engine.max_slots,
        max_prompts=engine.max_queue,
        end_ids=engine.end_ids,
    )


def build_app(engine: LiveEngine, tokenizer, *, model_name: str, api_key: str | None = None):
    """The FastAPI application over a started engine."""
    app = FastAPI(title="jaxpatience", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(_Door)
    max_chars = wire.max_prompt_chars(tokenizer, engine.max_model_len)

    def authorize(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        right = scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), (api_key or "").encode())
        if api_key and not right:  # the scheme's name is case-insensitive (RFC 9110), the key is not
            raise ApiError(
                401, "missing or wrong API key (send 'Authorization: Bearer KEY').", kind="authentication_error"
            )

    @app.get("/health")
    async def health():
        facts = {"slots": engine.max_slots, "busy": engine.busy, "waiting": engine.waiting, **engine.stats}
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": engine.error, **facts}, status_code=503)
        return {"status": "ok", **facts}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        card = {
            "id": model_name,
            "object": "model",
            "created": 0,
            "owned_by": "jaxpatience",
            "max_model_len": engine.max_model_len,
        }
        return {"object": "list", "data": [card]}

    async def complete(request: Request, chat: bool):
        authorize(request)
        raw = await _read_body(request)
        # Parsing and tokenizing run beside the event loop: a large prompt must not stall the other streams.
        settings = await asyncio.to_thread(_read_request, raw, chat, engine, tokenizer, model_name, max_chars)
        pending = _Request(engine, settings)
        pending.submit()
        if settings.stream:
            return StreamingResponse(
                _stream(pending, tokenizer, chat=chat, model=model_name, scope=request.scope),
                media_type="text/event-stream",
            )
        result = await _collect(request, pending, tokenizer, chat=chat, model=model_name)
        return JSONResponse(result if result is not None else {}, status_code=200 if result is not None else 499)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app


def _warm_up(engine: LiveEngine) -> None:
    """Compile the first executables with one short greedy request before the port opens."""
    finished = threading.Event()
    engine.submit(Job(prompt_ids=[0], emit=lambda d: (d.finish_reason or d.error) and finished.set(), max_tokens=2))
    finished.wait()
    if engine.error is not None:
        raise RuntimeError(f"the engine failed while warming up: {engine.error}")


# ---------------------------------------------------------------------------------------------------
# Command line: `jaxpatience serve ...` (cli.py dispatches here). The flags are aliases of ServeConfig keys.

FLAGS = {
    "--model": ("model", "HF checkpoint directory or .gguf file"),
    "--adapter": ("adapter", "a PEFT LoRA adapter directory to apply on top of --model"),
    "--served-model-name": ("served_model_name", "the name clients ask for (default: the checkpoint's folder name)"),
    "--host": ("host", "address to bind (default: 127.0.0.1, this machine only)"),
    "--port": ("port", "default: 8000"),
    "--api-key": ("api_key", "require 'Authorization: Bearer KEY' (default: $JAXPATIENCE_API_KEY, else none)"),
    "--slots": ("slots", "rows decoded at once (default: 16)"),
    "--max-model-len": ("max_model_len", "context per slot: prompt + max_tokens (default: the model's)"),
    "--max-queue": ("max_queue", "requests waiting for a slot before 429 (default: 256)"),
    "--chunk-steps": ("chunk_steps", "decode steps between two looks from the host (default: 8)"),
    "--dtype": ("param_dtype", "weight dtype: float32 or bfloat16 (default: float32)"),
    "--mesh": ("mesh", "e.g. tensor=4: weights and slots sharded over this host's devices"),
}


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening (connections are refused until the server starts); a
    host that does not resolve or a port that cannot be had is one sentence."""
    try:
        (family, kind, proto, _, address), *_ = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as err:
        raise ConfigError(f"serve: host {host!r} is not an address of this machine ({err.strerror}).") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: no wait after a restart
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        hint = {
            errno.EADDRINUSE: "; another program listens there: choose another --port (0: any free one)",
            errno.EACCES: "; ports below 1024 need privileges: choose another --port",
            errno.EADDRNOTAVAIL: "; it is not an address of this machine: check --host",
        }.get(err.errno, "")
        raise ConfigError(f"serve: cannot listen on {host}:{port} ({err.strerror or err}){hint}.") from None
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("jaxpatience serve", "Serve a checkpoint over an OpenAI-compatible HTTP API.", FLAGS)
    config = config_from_args(ServeConfig, parser.parse_intermixed_args(argv)).validate()
    if sharding.initialize_distributed():
        raise ConfigError("serve runs in one process; use --mesh over this host's devices instead.")
    listening = _listen(config.host, config.port)  # before the model loads: a taken port fails in a second
    try:
        return _serve(config, listening)
    finally:
        listening.close()


def _serve(config: ServeConfig, listening: socket.socket) -> int:
    mesh = None
    if config.mesh is not None:
        try:
            mesh = sharding.make_mesh(**dataclasses.asdict(config.mesh or MeshConfig()))
        except ValueError as err:
            raise ConfigError(f"mesh: {err}") from None
    model, tokenizer = load_pretrained(config.model, config.param_dtype, compute_dtype=config.compute_dtype, mesh=mesh)
    if config.adapter:
        model = lora.load_adapter(model, config.adapter)
    context = model.config.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > context:
        raise ConfigError(f"max_model_len={config.max_model_len} is more than the model's context of {context}.")
    engine = LiveEngine(
        model,
        tokenizer,
        slots=config.slots,
        max_model_len=config.max_model_len,
        chunk_steps=config.chunk_steps,
        max_queue=config.max_queue,
        mesh=mesh,
    ).start()
    name = config.served_model_name or Path(config.model).resolve().name
    api_key = config.api_key or os.environ.get("JAXPATIENCE_API_KEY") or None
    try:
        _warm_up(engine)
        app = build_app(engine, tokenizer, model_name=name, api_key=api_key)
        # In-flight requests get 10 s to finish on Ctrl-C / SIGTERM; a failed engine stops the server (exit 1), so
        # that a supervisor can restart it rather than keep a process that answers 503.
        server = uvicorn.Server(
            uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=10)
        )
        engine.on_failure = lambda: setattr(server, "should_exit", True)
        port = listening.getsockname()[1]  # --port 0: the one the system chose
        print(
            f"serving {name!r} at http://{config.host}:{port}/v1 ({engine.max_slots} slots, context "
            f"{engine.max_model_len} tokens{', API key required' if api_key else ''})",
            flush=True,
        )
        server.run(sockets=[listening])
    finally:
        engine.stop()
    if engine.error is not None:
        print(f"jaxpatience serve: the engine failed: {engine.error}", file=sys.stderr)
        return 1
    return 0
