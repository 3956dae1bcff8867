"""An OpenAI-compatible HTTP API: each assistant is a model, reachable with that assistant's API keys."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from storage import Store, StorageError, ThreadStores
from tuning.answering.requests import ContextLengthExceeded, InferenceError
from tuning.answering.service import (abstain_text_for, finish_answer, plan_answer, record_answer,
                                      streamed_citation)
from tuning.errors import ModelLoadError, TuningError
from tuning.grounding import CitationFilter

log = logging.getLogger(__name__)

# model id suffixes: "acme" is the active version (few-shot before any training), "acme:base" the base model, …
MODEL_SUFFIXES = {"": "auto", "tuned": "tuned", "grounded": "grounded", "base": "base", "fewshot": "fewshot"}
LISTED_SUFFIXES = ("", "base", "fewshot")
VERSION_SUFFIX = re.compile(r"v([0-9]{1,18})")  # acme:v12 (at most 18 digits: an SQLite integer)
# An absolute path in a message (after its start, a space, a quote or a bracket): only its last part is shown.
_SERVER_PATH = re.compile(r"(?<![^\s'\"(\[=])/[^\s'\"()\[\],;]*/[^\s'\"()\[\],;]*")


def public_message(text: str) -> str:
    """The message without server paths (a folder in an error text tells a client about the file system)."""
    return _SERVER_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "/", text)


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, public_message(message), type, code, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _thread_local_store(store: Store):
    """A Store per thread on the same file (SQLite connections stay in their thread); `:memory:` is shared."""
    path = next((row[2] for row in store.db.conn.execute("PRAGMA database_list") if row[1] == "main"), "")
    return ThreadStores(path, clock=store.clock, first=store) if path else (lambda: store)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")
    return bytes(body)


def _encodable(text: str) -> bool:
    """Whether the text is valid Unicode (JSON's \\ud800 escapes give lone surrogates, which SQLite refuses)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a content list."""
    text = None
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) == len(content) and all(isinstance(part, str) for part in parts):
            text = "".join(parts)
    if text is None or not _encodable(text):
        raise ApiError(400, "message content must be a string or a list of text parts", code="invalid_content")
    return text


def _parse_request(body: bytes, *, max_tokens_limit: int) -> dict:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply", code="invalid_json") from None
    except ValueError:  # e.g. an integer of more than 4,300 digits
        raise ApiError(400, "the body holds a number too large to read", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    model = data.get("model")
    if not isinstance(model, str) or not model or not _encodable(model):
        raise ApiError(400, "`model` is required (an assistant name)", code="missing_model")
    raw = data.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "`messages` must be a non-empty list", code="invalid_messages")
    messages = []
    for m in raw:
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, "each message needs a role: system, user or assistant", code="invalid_messages")
        role = "system" if m["role"] == "developer" else m["role"]
        messages.append({"role": role, "content": _text(m.get("content"))})
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must come from the user", code="invalid_messages")
    if not messages[-1]["content"].strip():
        raise ApiError(400, "the last message has no text: ask a question", code="invalid_messages")
    max_tokens = data.get("max_completion_tokens") or data.get("max_tokens")
    temperature = data.get("temperature")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ApiError(400, "`max_tokens` must be a positive integer", code="invalid_max_tokens")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 2):
        raise ApiError(400, "`temperature` must be a number between 0 and 2", code="invalid_temperature")
    return {"model": model, "messages": messages, "stream": bool(data.get("stream")),
            "max_tokens": min(max_tokens, max_tokens_limit) if max_tokens else None,
            "temperature": None if temperature is None else float(temperature)}


def _model_ids(name: str) -> list[str]:
    return [name + (":" + s if s else "") for s in LISTED_SUFFIXES]


def create_api_app(store: Store, engine, *, engine_for=None, max_body_bytes: int = 1_000_000,
                   max_tokens_limit: int = 1024, indexes=None) -> FastAPI:
    """The FastAPI app: GET /health, GET /v1/models, POST /v1/chat/completions (with and without stream).

    `engine` serves the default base model; `engine_for(base_model)` gives the engine of an assistant whose
    base model differs (the composition root's App.engine_for); without it every assistant uses `engine`.
    `indexes` (tuning.retrieval.AssistantIndexes) keeps each assistant's retriever between requests.
    An answer the assistant is unsure of (the default model id) is the "I don't know" text, and the
    question is queued for the experts, as in the chat.
    """
    app = FastAPI(title="Tunebot", description="OpenAI-compatible API of Tunebot assistants", docs_url=None,
                  redoc_url=None)
    _add_error_handlers(app)
    get_store = _thread_local_store(store)

    def assistant_engine(assistant):
        return engine_for(assistant.base_model) if engine_for is not None and assistant.base_model else engine

    @app.get("/health")
    async def health():
        return {"status": "ok", "backend": type(engine).__name__,
                "resident_adapters": len(getattr(engine, "resident_adapters", [])),
                "in_flight": getattr(engine, "in_flight", 0)}

    @app.get("/v1/models")
    async def list_models(request: Request):
        key = await _authenticate(request, get_store)
        assistant = await run_in_threadpool(lambda: get_store().get_assistant(key.assistant_id))
        created = int(time.mktime(time.strptime(assistant.created_at, "%Y-%m-%d %H:%M:%S"))) if assistant.created_at else 0
        return {"object": "list", "data": [{"id": mid, "object": "model", "created": created, "owned_by": "tunebot"}
                                           for mid in _model_ids(assistant.name)]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        key = await _authenticate(request, get_store)
        req = _parse_request(await _read_body(request, max_body_bytes), max_tokens_limit=max_tokens_limit)
        assistant, mode, version_id = await run_in_threadpool(lambda: _resolve_model(get_store(), key, req["model"]))
        question = req["messages"][-1]["content"]
        try:
            plan = await run_in_threadpool(lambda: plan_answer(get_store(), assistant.id, question, mode=mode,
                                                               version_id=version_id, indexes=indexes))
        except TuningError as exc:
            raise ApiError(400, str(exc), code="model_not_ready") from None
        except StorageError as exc:  # e.g. the version was deleted meanwhile
            raise ApiError(404, str(exc), code="model_not_found") from None
        if plan.unsure:
            pieces, generation = iter([abstain_text_for(question)]), None
        else:
            try:
                pieces, generation = await run_in_threadpool(_start, assistant_engine(assistant), req, plan)
            except TuningError as exc:  # e.g. the assistant's base model cannot be loaded
                raise _engine_error(exc) from None
        completion = _Completion(get_store, req, plan, question, pieces, generation)
        return await (completion.streamed() if req["stream"] else completion.whole(request))

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), type="invalid_request_error").response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.error("request failed", exc_info=exc)
        return ApiError(500, "internal error: the server log has the details", type="server_error",
                        code="internal_error").response()


# Every store call runs in the thread pool: a write lock held elsewhere (SQLite waits up to its busy
# timeout) must not stall the event loop, and with it /health and every other request.
async def _authenticate(request: Request, get_store):
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing API key: send `Authorization: Bearer <key>` (create one with "
                            "`tunebot apikey create --assistant NAME`)", type="authentication_error",
                       code="invalid_api_key")
    key = await run_in_threadpool(lambda: get_store().use_api_key(token.strip()))  # also records last_used_at
    if key is None:
        raise ApiError(401, "invalid or revoked API key", type="authentication_error", code="invalid_api_key")
    return key


def _resolve_model(s: Store, key, model: str):
    """(assistant, mode, version id) for a model id the key may use (store calls: run it in the thread pool)."""
    name, _, suffix = model.partition(":")
    assistant = s.find_assistant(name)
    version_id = None
    if match := VERSION_SUFFIX.fullmatch(suffix):
        mode, version_id = "version", int(match.group(1))
    elif suffix in MODEL_SUFFIXES:
        mode = MODEL_SUFFIXES[suffix]
    else:
        assistant = None
    if assistant is None:
        raise ApiError(404, f"the model {model!r} does not exist", code="model_not_found")
    if assistant.id != key.assistant_id:
        raise ApiError(403, f"this API key cannot use the model {model!r}", type="permission_error",
                       code="model_not_allowed")
    if version_id is not None and version_id not in {v.id for v in s.list_model_versions(assistant.id)}:
        raise ApiError(404, f"the model {model!r} does not exist: {assistant.name} has no version "
                            f"{version_id}", code="model_not_found")
    return assistant, mode, version_id


class _Completion:
    """One chat completion being answered: sent whole or as server-sent events, then recorded."""

    def __init__(self, get_store, req: dict, plan, question: str, pieces, generation) -> None:
        self.get_store, self.req, self.plan, self.question = get_store, req, plan, question
        self.pieces, self.generation = pieces, generation
        self.id = "chatcmpl-" + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.started = time.perf_counter()

    def finish(self, raw: str) -> dict:
        """Record the exchange (and queue an "I don't know" for the experts); usage and the shown text."""
        generation, plan = self.generation, self.plan
        stopped = generation.stopped if generation else True
        prompt = generation.prompt_tokens if generation else 0
        completion = generation.n_tokens if generation else len(raw.split())
        outcome = finish_answer(plan, raw, generation.token_logprobs if generation else (),
                                generation.alternatives if generation else (),
                                abstain_text=abstain_text_for(self.question))
        store_ = self.get_store()
        conversation_id, message_id = record_answer(store_, plan, self.question, outcome.text,
                                                    abstained=outcome.abstained, sources=outcome.sources,
                                                    latency_ms=(time.perf_counter() - self.started) * 1000)
        if outcome.abstained and plan.may_abstain:
            store_.add_unanswered(plan.assistant_id, self.question, conversation_id=conversation_id,
                                  message_id=message_id)
        return {"finish_reason": "stop" if stopped else "length", "text": outcome.text,
                "abstained": outcome.abstained,
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}

    async def whole(self, request: Request):
        try:
            raw = await _collect_unless_disconnected(request, self.pieces, self.generation)
        except TuningError as exc:
            raise _engine_error(exc) from None
        if raw is None:  # the client went away: its generation was cancelled, and nothing is recorded
            return JSONResponse({"error": {"message": "the client closed the connection", "type":
                                           "invalid_request_error", "param": None, "code": "client_closed"}},
                                status_code=499)
        done = await run_in_threadpool(self.finish, raw)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.req["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done["text"]},
                             "finish_reason": done["finish_reason"], "logprobs": None}],
                "usage": done["usage"]}

    async def streamed(self):
        return StreamingResponse(self._events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _chunk(self, delta: dict, finish_reason: str | None = None, **extra) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.req["model"], "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                                         "logprobs": None}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def _events(self):
        plan, generation = self.plan, self.generation
        parts: list[str] = []
        visible = CitationFilter(streamed_citation(plan, lambda: generation.alternatives if generation else ())) \
            if plan.mode == "grounded" and not plan.unsure else None
        streamed = False
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            async for piece in iterate_in_threadpool(self.pieces):
                parts.append(piece)
                shown = visible.feed(piece) if visible is not None else piece
                if shown:
                    streamed = True
                    yield self._chunk({"content": shown})
            done = await run_in_threadpool(self.finish, "".join(parts))
            if not streamed and not plan.unsure and done["text"]:  # "I don't know", or the approved answer the choice fell on
                yield self._chunk({"content": done["text"]})
            yield self._chunk({}, done["finish_reason"], usage=done["usage"])
        except TuningError as exc:
            error = _engine_error(exc)
            yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.type}})}\n\n"
        finally:
            if generation is not None:
                generation.cancel()  # a client that went away stops the generation
        yield "data: [DONE]\n\n"


async def _collect_unless_disconnected(request: Request, pieces, generation) -> str | None:
    """The whole answer, or None when the client disconnects first: the generation is then cancelled
    (it used to run to its end, minutes of CPU for nobody, and shutdown waited for it)."""
    stop = threading.Event()

    def collect() -> str:
        parts = []
        for piece in pieces:
            parts.append(piece)
            if stop.is_set():  # a remote stream: stop reading it
                break
        return "".join(parts)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(run_in_threadpool(collect))
    gone = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():  # disconnected, or this request itself was cancelled (shutdown)
            stop.set()
            if generation is not None:
                generation.cancel()
            work.add_done_callback(lambda task: task.cancelled() or task.exception())
    return work.result() if work.done() else None


def _start(engine, req: dict, plan):
    """(text pieces, Generation or None): the local engine gives exact token counts and the finish reason."""
    if hasattr(engine, "submit"):  # a local engine (torch or llama.cpp)
        messages = plan.messages(req["messages"])
        generation = engine.submit(messages, adapter_dir=plan.adapter_dir, max_new_tokens=req["max_tokens"],
                                   temperature=req["temperature"])
        return iter(generation), generation
    messages = req["messages"]
    if plan.prompt is not None:
        messages = [*messages[:-1], {**messages[-1], "content": plan.prompt}]
    return engine.stream(messages, **plan.engine_kwargs(), max_new_tokens=req["max_tokens"],
                         temperature=req["temperature"]), None


def _engine_error(exc: TuningError) -> ApiError:
    if isinstance(exc, ContextLengthExceeded):
        return ApiError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, ModelLoadError):  # the assistant's base model or adapter files: the operator's to fix
        log.error("model unavailable: %s", exc)
        return ApiError(503, "the assistant's model cannot be loaded right now; the server log has the details",
                        type="server_error", code="model_unavailable")
    if isinstance(exc, InferenceError):
        return ApiError(400, str(exc), code="inference_error")
    log.error("inference failed: %s", exc)
    return ApiError(500, str(exc), type="server_error", code="inference_failed")
