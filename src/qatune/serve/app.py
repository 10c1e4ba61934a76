"""The HTTP routes: OpenAI's chat completions, completions and models, a health check, the chat page.

Every request is validated and turned into token ids here, before anything is queued, so a bad
request is answered with a 4xx and never reaches the batcher. Streams are server-sent events
(`data: {json}` per chunk, `data: [DONE]` at the end), as OpenAI and vLLM send them. When a client
goes away, its sequences are cancelled and their batch rows freed at the next decode step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from qatune.data.encode import generation_ids, tokenize_with_eos
from qatune.data.model_template import ModelTemplate
from qatune.data.records import Message
from qatune.data.templates import Template
from qatune.generation.continuous import QueueFull
from qatune.generation.sampling import SamplingConfig
from qatune.serve import protocol as api
from qatune.serve.engine import AsyncEngine, Job

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
PUBLIC = ("/", "/health")  # the page is a static file; it asks for the key when the API wants one


@dataclass
class ServedModel:
    name: str  # the id clients send as `model`
    tokenizer: object
    template: Template | ModelTemplate  # renders chat messages exactly as in training (bound to the tokenizer)
    context: int
    vocab_size: int  # the model's: a token-id prompt must stay below it
    created: int


def create_app(engine: AsyncEngine, served: ServedModel, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="qatune", docs_url=None, redoc_url=None, openapi_url=None)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), api_key.encode()):
            raise api.APIError(
                401, "Incorrect or missing API key (send 'Authorization: Bearer KEY').", None, "invalid_api_key"
            )

    @app.exception_handler(api.APIError)
    async def api_error(request: Request, e: api.APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        message = {404: f"Unknown URL: {where}", 405: f"Method not allowed: {where}"}.get(e.status_code, str(e.detail))
        return JSONResponse(api.APIError(e.status_code, message).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(api.APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("qatune.serve").joinpath("static/chat.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served.name, **engine.batcher.load()}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict:
        return {"object": "list", "data": [api.model_card(served.name, served.created, served.context)]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(request: Request):
        req = api.parse(api.ChatRequest, await request.body())
        check_model(req.model, served.name)
        prompt = chat_prompt_ids(req.messages, served)
        sampling = sampling_for(req, [prompt], served.context, req.max_completion_tokens or req.max_tokens, "messages")
        job = submit(engine, [prompt], sampling, req)
        rid = api.new_id("chatcmpl")
        if req.stream:
            return sse(chat_stream(job, rid, served.name, len(prompt), include_usage(req)))
        texts, reasons, tokens = await collect(job, request)
        return api.chat_response(rid, served.name, texts, reasons, api.usage(len(prompt), tokens))

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request):
        req = api.parse(api.CompletionRequest, await request.body())
        check_model(req.model, served.name)
        prompts = [completion_prompt_ids(p, served) for p in req.prompt]
        sampling = sampling_for(req, prompts, served.context, req.max_tokens, "prompt")
        job = submit(engine, prompts, sampling, req)
        rid = api.new_id("cmpl")
        n_prompt = sum(len(p) for p in prompts)
        if req.stream:
            return sse(completion_stream(job, rid, served.name, n_prompt, include_usage(req)))
        texts, reasons, tokens = await collect(job, request)
        return api.completion_response(rid, served.name, texts, reasons, api.usage(n_prompt, tokens))

    return app


# --- request -> token ids and sampling settings ------------------------------------------------


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise api.APIError(
            404, f"The model '{requested}' does not exist; this server serves '{served}'.", "model", "model_not_found"
        )


def chat_prompt_ids(messages: list[api.ChatMessage], served: ServedModel) -> list[int]:
    """The conversation through the model's template, exactly as `qatune chat` and training render
    it: qatune's templates with EOS after earlier answers, the model's own chat template as
    apply_chat_template(messages, add_generation_prompt=True)."""
    if messages[-1].role != "user":
        raise api.APIError(400, "The last message must have role 'user': the model answers a user turn.", "messages")
    return generation_ids(served.template, [Message(m.role, m.content) for m in messages], served.tokenizer)


def completion_prompt_ids(prompt: str | list[int], served: ServedModel) -> list[int]:
    """A text prompt as it is (no template: that is what completions means), or token ids."""
    if isinstance(prompt, str):
        [ids] = tokenize_with_eos([prompt], served.tokenizer)
        if not ids:
            raise api.APIError(
                400, "Invalid value for 'prompt': the prompt is empty; the model needs at least one token.", "prompt"
            )
        return ids
    vocab = served.vocab_size
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise api.APIError(
            400, f"Invalid value for 'prompt': token id {bad} is outside the vocabulary (0..{vocab - 1}).", "prompt"
        )
    return prompt


def sampling_for(
    req: api.Sampling, prompts: list[list[int]], context: int, max_tokens: int | None, what: str
) -> SamplingConfig:
    """OpenAI's defaults (temperature 1, top_p 1); max_tokens defaults to what the context leaves
    (chat) or 16 (completions); a prompt plus max_tokens beyond the context is a 400, with
    OpenAI's wording."""
    longest = max(len(p) for p in prompts)
    kind = "messages" if what == "messages" else "prompt"
    if longest >= context:
        raise api.APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, your {kind} resulted in "
            f"{longest} tokens, which leaves no room for a completion. Please reduce the length of the {kind}.",
            what,
            "context_length_exceeded",
        )
    if max_tokens is not None and longest + max_tokens > context:
        raise api.APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested {longest + max_tokens} "
            f"tokens ({longest} in the {kind}, {max_tokens} in the completion). Please reduce the length of the "
            f"{kind} or completion.",
            "max_tokens",
            "context_length_exceeded",
        )
    if max_tokens is None:
        room = context - longest
        max_tokens = room if what == "messages" else min(COMPLETIONS_DEFAULT_MAX_TOKENS, room)
    return SamplingConfig(
        max_new_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
    )


def submit(engine: AsyncEngine, prompts: list[list[int]], sampling: SamplingConfig, req: api.Sampling) -> Job:
    n = req.n or 1
    batcher = engine.batcher
    if len(prompts) * n > batcher.max_waiting:
        raise api.APIError(
            400,
            f"This request asks for {len(prompts) * n} sequences; the server queues at most {batcher.max_waiting}.",
            "n",
        )
    try:
        return engine.submit(prompts, sampling, n, req.stop)
    except QueueFull as e:
        raise api.APIError(429, f"The server is busy ({e}); please retry shortly.", None, "queue_full") from None


def include_usage(req: api.Sampling) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


# --- answers ------------------------------------------------------------------------------------


async def collect(job: Job, request: Request) -> tuple[list[str], list[str], int]:
    """All outputs of a job; if the client disconnects first, the job is cancelled."""

    async def gather():
        texts, reasons, tokens = [""] * len(job.sequences), [""] * len(job.sequences), 0
        async for i, out in job.outputs():
            texts[i] += out.text
            if out.finish_reason == "error":
                raise api.APIError(500, f"generation failed: {out.error}", None, "generation_error")
            if out.finish_reason is not None:
                reasons[i], tokens = out.finish_reason, tokens + out.tokens
        return texts, reasons, tokens

    result = asyncio.ensure_future(gather())
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            result.cancel()
            job.cancel()
    if not result.done() or result.cancelled():
        raise api.APIError(499, "client closed the request")
    return result.result()


async def disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(events: AsyncIterator[dict | str]) -> StreamingResponse:
    async def body():
        async for event in events:
            data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
            yield f"data: {data}\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def chat_stream(job: Job, rid: str, model: str, n_prompt: int, with_usage: bool) -> AsyncIterator[dict | str]:
    created = api.now()
    chunk = lambda choices, usage=None: api.chat_chunk(rid, created, model, choices, with_usage, usage)
    try:
        for i in range(len(job.sequences)):
            yield chunk([api.chat_delta(i, {"role": "assistant", "content": ""})])
        tokens = 0
        async for i, out in job.outputs():
            if out.finish_reason == "error":
                yield api.APIError(500, f"generation failed: {out.error}", None, "generation_error").body()
                break
            if out.text:
                yield chunk([api.chat_delta(i, {"content": out.text})])
            if out.finish_reason is not None:
                tokens += out.tokens
                yield chunk([api.chat_delta(i, {}, out.finish_reason)])
        else:
            if with_usage:
                yield chunk([], api.usage(n_prompt, tokens))
        yield "[DONE]"
    finally:  # also when the client went away mid-stream: free the batch rows
        job.cancel()


async def completion_stream(
    job: Job, rid: str, model: str, n_prompt: int, with_usage: bool
) -> AsyncIterator[dict | str]:
    created = api.now()
    chunk = lambda choices, usage=None: api.completion_chunk(rid, created, model, choices, with_usage, usage)
    try:
        tokens = 0
        async for i, out in job.outputs():
            if out.finish_reason == "error":
                yield api.APIError(500, f"generation failed: {out.error}", None, "generation_error").body()
                break
            if out.text or out.finish_reason:
                yield chunk([api.completion_delta(i, out.text, out.finish_reason)])
            if out.finish_reason is not None:
                tokens += out.tokens
        else:
            if with_usage:
                yield chunk([], api.usage(n_prompt, tokens))
        yield "[DONE]"
    finally:
        job.cancel()
