"""
serve.py — a checkpoint behind OpenAI's HTTP API, streaming token by token, with a small chat page.

    python serve.py out/sft_alpaca                         # http://127.0.0.1:8000/ : the chat page
    python serve.py out/gpt2_124m --format none --port 8080 --api_key sk-local
    python serve.py hf:exported/ --device cuda --host 0.0.0.0

Every client that speaks OpenAI's API talks to it: the `openai` package, curl, Open WebUI and other front ends.

    POST /v1/chat/completions   messages -> chat_format.render (the checkpoint's format, or --format), the
                                assistant's turn left open, answered by generation.py's decode loop (KV cache)
    POST /v1/completions        a prompt continued as plain text (format 'none'): for pretrained models
    GET  /v1/models             the one model this server holds
    GET  /                      assets/chat.html: a chat page that streams the answer with fetch()

The model is loaded exactly as chat.py loads it (chat.load_chat: checkpoint.py, the format check, the dtype).
A request goes, top to bottom:

    API key -> JSON -> pydantic model (a wrong type is a 400 naming the field) -> prompt ids (400 if they do not
    fit the context, saying by how many tokens) -> wait for the model (FIFO, bounded: 503 past it) -> decode
    (generation.stream, one token per step on a worker thread, the text into the request's own buffer)
    -> the response reads that buffer: `data: {chat.completion.chunk}` events ending in `data: [DONE]`
       (stream: true), or one JSON body

Queued, not batched. One request holds the model at a time; the others wait in arrival order (asyncio.Lock
wakes its waiters first come, first served). generation.py's loop decodes one sequence with a KV cache sized to
it; batching requests of different lengths needs a ragged cache and per-row positions (continuous batching, as
vLLM does), which is a different engine, and would change the numbers a prompt gets from those chat.py and
generate() give it. At batch 1 a 124M model decodes hundreds of tokens per second on a GPU (bench/serve.py),
enough for a handful of people; past that, batching is the next chapter, not a tweak.

No client can hold the model forever: the wait is bounded (--queue_timeout, --max_queue), an answer by
max_tokens and the context, and the model is held only while tokens are computed, never while a slow client
reads: the decoder writes into the request's own buffer (at most max_tokens pieces) and the response drains it.
A client that disconnects frees the model at the next token: the decoder asks request.is_disconnected() before
each step, and closing the response stream (Starlette does when the client goes) tells it too.

Errors are OpenAI's error object, {"error": {"message", "type", "param", "code"}}, with the status OpenAI uses:
400 for a bad request, 401 for a wrong key, 404 for an unknown path, 503 when the queue is full. Never a
traceback, and the server keeps serving.
"""
import argparse
import asyncio
import json
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import anyio
import torch
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException

from chat import add_model_args, load_from_args
from chat_format import ChatFormat
from checkpoint import HF_PREFIX
from generation import GenerationConfig, stream

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "chat.html")
log = logging.getLogger("uvicorn.error")  # uvicorn's own log: one stream, one format


# ---- requests: what OpenAI's API accepts, typed (a wrong type is an error naming the field) --------------------
class Strict(BaseModel):
    # strict: "0.5" is not a number and 1 is not a bool, as OpenAI's API says; extra="forbid": a misspelt
    # field (temprature) is an error, not silently ignored
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    model_config = ConfigDict(strict=True, extra="ignore")  # name, tool_call_id...: not used by any format
    role: Literal["system", "developer", "context", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self):
        """chat_format's message: content parts joined, 'developer' (OpenAI's newer name) read as 'system'."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """The fields both endpoints share. top_k, repetition_penalty and min_tokens are not OpenAI's; they are
    generation.py's, under the names vLLM gives them."""
    model: str | None = None                # any name is accepted: this server holds one model
    temperature: float = Field(1.0, ge=0, le=2)            # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = None           # None: as many as the context leaves
    max_completion_tokens: int | None = None               # OpenAI's newer name for max_tokens
    stop: str | list[str] | None = None     # the answer ends before the first of these (not included)
    seed: int | None = None                 # same seed, same request -> same answer
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1                       # one answer per request (see the top: one sequence at a time)
    user: str | None = None
    frequency_penalty: Literal[0, 0.0] = 0  # accepted at OpenAI's default only; see repetition_penalty
    presence_penalty: Literal[0, 0.0] = 0
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    min_tokens: int = Field(0, ge=0)

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def positive(cls, v):
        if v is not None and v <= 0:
            raise ValueError(f"must be at least 1 (the most tokens to generate), got {v}")
        return v

    @field_validator("stop")
    @classmethod
    def at_most_four(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(v)}")
        return v


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]
    echo: Literal[False] = False


class APIError(Exception):
    """An error the client gets as OpenAI's error object."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(e):
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body, status_code=e.status, headers=headers)


def validation_error(e):
    """pydantic's first complaint as one line naming the field, as OpenAI's errors do."""
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"] if p != "body"]
    # a union (str | list[...]) reports every branch: name the field, not the branch that failed last
    branch = ("str", "int", "float", "bool")
    param = ".".join(p for p in loc if p not in branch and not p.startswith(("list[", "function-", "literal[")))
    if err["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if err["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{param}'", param, "missing_required_parameter")
    message = err["msg"].removeprefix("Value error, ")
    given = f" (got {json.dumps(err['input'])[:60]})" if "input" in err and err["type"] != "value_error" else ""
    return APIError(400, f"Invalid value for '{param}': {message}{given}", param or None, "invalid_value")


async def parse(request, model):
    """The body as `model`: malformed JSON and wrong fields are APIErrors (400)."""
    body = await request.body()
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request: {e}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The body must be a JSON object, got {type(data).__name__}", None, "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


# ---- the engine: one model, one sequence at a time, a FIFO queue in front -------------------------------------
class StopText:
    """OpenAI's `stop` strings: the answer ends just before the first one, which is not returned. A piece of text
    that could be the start of one is held back until the next piece settles it, so a stream never shows text
    that the final answer does not contain."""

    def __init__(self, stops):
        self.stops, self.held = [s for s in stops if s], ""

    def push(self, text):
        """-> (text that can be sent now, whether a stop string was reached)."""
        text, self.held = self.held + text, ""
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            return text[:min(found)], True
        # the longest tail of `text` that is a proper prefix of some stop string waits for more text
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        if keep:
            text, self.held = text[:-keep], text[-keep:]
        return text, False


@dataclass
class Finish:
    reason: str               # stop (end token or stop string) | length (max_tokens or the context) | gone | error
    tokens: int               # tokens the model computed for this answer (an end token included)
    message: str = ""


@dataclass
class Job:
    fmt: ChatFormat           # decodes the answer; its stop_ids end it
    prompt_ids: list
    gen: GenerationConfig
    seed: int
    stop: list
    request: Request
    pieces: asyncio.Queue = field(default_factory=asyncio.Queue)   # text pieces, then one Finish
    gone: bool = False        # the response was closed: its client is not reading any more


class Engine:
    def __init__(self, model, chat, max_queue, queue_timeout):
        self.model, self.chat = model, chat
        self.plain = ChatFormat("none", chat.enc)   # /v1/completions: text in, text out
        V, device = model.config.padded_vocab_size, model.wte.weight.device
        self.allowed = {f.name: f.allowed_mask(V, device) for f in (chat, self.plain)}
        self.lock = asyncio.Lock()   # its waiters are woken in arrival order: this is the queue
        self.waiting, self.max_queue, self.queue_timeout = 0, max_queue, queue_timeout

    async def submit(self, job):
        """Wait for the model, then start decoding `job` in the background (job.pieces fills up). 503 when
        max_queue requests already wait, or when the model stays busy for queue_timeout seconds."""
        if self.waiting >= self.max_queue:
            raise APIError(503, f"The server is overloaded: {self.waiting} requests are already waiting for the "
                                f"model. Retry shortly.", None, "server_overloaded", "server_error")
        self.waiting += 1
        try:
            async with asyncio.timeout(self.queue_timeout):
                await self.lock.acquire()
        except TimeoutError:
            raise APIError(503, f"The model stayed busy for {self.queue_timeout:g} s; retry shortly.", None,
                           "server_overloaded", "server_error") from None
        finally:
            self.waiting -= 1
        asyncio.create_task(self.decode(job))  # it releases the lock when the answer is done

    async def decode(self, job):
        """Holds the model until the answer ends or its client is gone. Each step (the first one is the prefill)
        runs on a worker thread, so the event loop keeps answering other requests meanwhile."""
        t0, n, finish = time.perf_counter(), 0, None
        generator = torch.Generator(self.model.wte.weight.device).manual_seed(job.seed)
        tokens = stream(self.model, job.prompt_ids, job.gen, self.allowed[job.fmt.name], generator)
        decoder, stops = job.fmt.stream_decoder(), StopText(job.stop)
        try:
            while finish is None:
                if job.gone or await job.request.is_disconnected():
                    finish = Finish("gone", n)
                    break
                token = await anyio.to_thread.run_sync(next, tokens, None)
                n += token is not None
                if token is None or token in job.fmt.stop_ids:     # max_tokens/the context, or the end token
                    finish = Finish("length" if token is None else "stop", n)
                    text, hit = stops.push(decoder.flush())
                    text += "" if hit else stops.held                 # held back for a stop string that never came
                else:
                    text, hit = stops.push(decoder.push(token))
                    finish = Finish("stop", n) if hit else None
                if text:
                    job.pieces.put_nowait(text)
        except Exception as e:  # a bug or out of memory: the client gets a 500 error object, the log the cause
            log.exception("decoding failed")
            finish = Finish("error", n, f"The server failed while generating: {type(e).__name__}: {e}")
        finally:
            tokens.close()
            self.lock.release()
        job.pieces.put_nowait(finish)
        log.info(f"answer: {len(job.prompt_ids)} prompt + {n} new tokens in {time.perf_counter() - t0:.2f} s, "
                 f"finish: {finish.reason}")


async def read(job):
    """Text pieces as the model writes them, then the Finish. Closing this early (the client went away) tells
    the decoder to stop at its next token."""
    try:
        while True:
            item = await job.pieces.get()
            yield item
            if isinstance(item, Finish):
                return
    finally:
        job.gone = True


# ---- from a request to a job, and from the job's pieces to OpenAI's response objects --------------------------
def budget(block, n_prompt, asked, what):
    """How many tokens the answer may have. 400 when the prompt, or the prompt and max_tokens, exceed the
    context, saying by how many tokens."""
    if n_prompt >= block:
        raise APIError(400, f"This model's context is {block} tokens and the {what} take {n_prompt}: "
                            f"{n_prompt - block + 1} tokens too many (at least one must be left for the answer). "
                            f"Shorten the {what}.", what, "context_length_exceeded")
    if asked is not None and n_prompt + asked > block:
        raise APIError(400, f"This model's context is {block} tokens; the {what} take {n_prompt} and max_tokens "
                            f"asks for {asked} more: {n_prompt + asked - block} tokens too many. Lower max_tokens "
                            f"(at most {block - n_prompt} here) or shorten the {what}.", "max_tokens",
                       "context_length_exceeded")
    return block - n_prompt if asked is None else asked


def make_job(engine, fmt, ids, req, request, what):
    max_new = budget(engine.model.config.block_size, len(ids), req.max_completion_tokens or req.max_tokens, what)
    try:
        gen = GenerationConfig(max_new_tokens=max_new, min_new_tokens=req.min_tokens, temperature=req.temperature,
                               top_k=req.top_k, top_p=req.top_p, repetition_penalty=req.repetition_penalty,
                               stop_ids=tuple(fmt.stop_ids))
    except ValueError as e:  # min_tokens > max_tokens
        raise APIError(400, f"Invalid sampling settings: {e}", "min_tokens", "invalid_value") from None
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    seed = secrets.randbits(63) if req.seed is None else req.seed % 2**64   # torch's seeds are 64-bit
    return Job(fmt, ids, gen, seed, stop, request)


def choice(chat, text, reason, delta):
    """One entry of `choices`: a chat message (or its delta, when streaming) or a completion's text."""
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    body = ({"content": text} if text or reason is None else {}) if delta else {"role": "assistant", "content": text}
    return {"index": 0, "delta" if delta else "message": body, "logprobs": None, "finish_reason": reason}


def usage(job, finish):
    n = len(job.prompt_ids)
    return {"prompt_tokens": n, "completion_tokens": finish.tokens, "total_tokens": n + finish.tokens}


async def events(job, chat, head, with_usage):
    """Server-sent events, as OpenAI streams: one `data: <chunk JSON>` per piece of text, a last chunk with the
    finish_reason (and one with the usage, if asked), then `data: [DONE]`."""
    def event(obj):
        return f"data: {json.dumps(obj)}\n\n"
    if chat:  # OpenAI's first chunk names the role
        yield event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]})
    async for item in read(job):
        if isinstance(item, str):
            yield event({**head, "choices": [choice(chat, item, None, delta=True)]})
        elif item.reason == "error":  # the status line is long gone: the error travels as an event
            yield event(APIError(500, item.message, None, "server_error", "server_error").body)
        else:
            yield event({**head, "choices": [choice(chat, "", item.reason, delta=True)]})
            if with_usage:
                yield event({**head, "choices": [], "usage": usage(job, item)})
    yield "data: [DONE]\n\n"


async def answer(engine, name, chat, job, stream_it, with_usage):
    """Queue the job, then stream its answer or wait for all of it."""
    await engine.submit(job)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "created": int(time.time()),
            "model": name, "object": "chat.completion" if chat else "text_completion"}
    if stream_it:
        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        return StreamingResponse(events(job, chat, head, with_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    pieces = [item async for item in read(job)]
    finish = pieces.pop()
    if finish.reason == "error":
        raise APIError(500, finish.message, None, "server_error", "server_error")
    return {**head, "choices": [choice(chat, "".join(pieces), finish.reason, delta=False)],
            "usage": usage(job, finish)}


# ---- the application --------------------------------------------------------------------------------------------
def build_app(model, chat, name, api_key=None, max_queue=64, queue_timeout=60.0):
    """The FastAPI app serving `model` (from chat.load_chat) under the name `name`."""
    engine, created = Engine(model, chat, max_queue, queue_timeout), int(time.time())

    async def check_key(request: Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not given:
            raise APIError(401, "You didn't provide an API key: send it as the header 'Authorization: Bearer "
                                "<key>' (the key the server was started with, --api_key).", None, "invalid_api_key")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect API key provided.", None, "invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "nanoforge", "format": chat.name,
                                            "context_length": model.config.block_size}]}

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatRequest)
        try:
            ids, _ = chat.render([m.as_dict() for m in req.messages], open_assistant=True)
        except ValueError as e:  # the order of roles: chat_format's rules
            raise APIError(400, f"Invalid 'messages': {e}", "messages", "invalid_value") from None
        job = make_job(engine, chat, ids, req, request, "messages")
        return await answer(engine, name, True, job, req.stream, req.stream_options and req.stream_options.include_usage)

    @v1.post("/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, f"Invalid 'prompt': one prompt per request, got {len(prompts)}", "prompt",
                           "invalid_value")
        ids, _ = engine.plain.render([{"role": "user", "content": prompts[0]}], open_assistant=True)
        job = make_job(engine, engine.plain, ids, req, request, "prompt")
        return await answer(engine, name, False, job, req.stream, req.stream_options and req.stream_options.include_usage)

    app = FastAPI(title="nanoforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(v1)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    async def api_error(request, e):
        return error_response(e)

    async def http_error(request, e):  # Starlette's own: an unknown path (404), a wrong method (405)
        what = "Unknown request URL" if e.status_code == 404 else e.detail
        return error_response(APIError(e.status_code, f"{what}: {request.method} {request.url.path}", None,
                                       "unknown_url" if e.status_code == 404 else None))

    async def server_error(request, e):  # a bug: the client gets one line, the log the traceback
        return error_response(APIError(500, f"The server had an error: {type(e).__name__}: {e}", None,
                                       "server_error", "server_error"))
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    return app


# ---- the command line -------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)  # checkpoint, --format, --device, --dtype: as chat.py
    p.add_argument("--name", default=None, help="the model's name in the API (default: the checkpoint's folder)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines (set --api_key then)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", default=os.environ.get("NANOFORGE_API_KEY"),
                   help="require 'Authorization: Bearer <key>' (default: $NANOFORGE_API_KEY, else no key)")
    p.add_argument("--max_queue", type=int, default=64, help="requests that may wait for the model; more: 503")
    p.add_argument("--queue_timeout", type=float, default=60.0, help="seconds a request may wait; longer: 503")
    args = p.parse_args(argv)
    if args.max_queue < 1 or args.queue_timeout <= 0:
        p.error("--max_queue must be >= 1 and --queue_timeout > 0")
    return args


def main(argv):
    args = parse_args(argv)
    model, chat, device = load_from_args(args)   # exactly as chat.py loads it
    name = args.name or os.path.basename(os.path.normpath(args.checkpoint.removeprefix(HF_PREFIX)))
    app = build_app(model, chat, name, args.api_key, args.max_queue, args.queue_timeout)
    print(f"serving {args.checkpoint} as '{name}': {model.num_params() / 1e6:.1f}M parameters, format "
          f"'{chat.name}', context {model.config.block_size}, on {device.type}; chat page at "
          f"http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
