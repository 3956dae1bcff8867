"""A scripted OpenAI-compatible chat completions server on 127.0.0.1, for fault injection in tests."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Reply:
    """One scripted answer: a chat message (status 200) or an HTTP error, optionally after a delay."""

    content: str | None = None
    status: int = 200
    headers: dict = field(default_factory=dict)
    delay_s: float = 0.0
    usage: tuple[int, int] = (20, 10)
    body: str | None = None  # raw body, overrides everything else


def chat_body(content: str, *, model: str = "fake", usage: tuple[int, int] = (20, 10)) -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}}


class FakeOpenAI:
    """Replies are taken from `script` in order; when it is empty, `default(request_json)` answers."""

    def __init__(self, default: Callable[[dict], Reply] | None = None):
        self.script: deque[Reply] = deque()
        self.default = default or (lambda request: Reply(status=500, content="no script"))
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                request = json.loads(self.rfile.read(length) or b"{}")
                with fake.lock:
                    fake.requests.append(request)
                    reply = fake.script.popleft() if fake.script else None
                if reply is None:
                    reply = fake.default(request)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.body is None and reply.status == 200 and request.get("stream"):
                    self._stream(reply.content or "", request.get("model", "fake"))
                    return
                if reply.body is not None:
                    payload = reply.body.encode()
                elif reply.status == 200:
                    payload = json.dumps(chat_body(reply.content or "", model=request.get("model", "fake"),
                                                   usage=reply.usage)).encode()
                else:
                    payload = json.dumps({"error": {"message": reply.content or f"scripted {reply.status}",
                                                    "type": "scripted", "code": reply.status}}).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def _stream(self, content: str, model: str) -> None:
                """stream=True: the content word by word as server-sent chunks, as the OpenAI API streams."""
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                for piece in re.findall(r"\S+\s*|\s+", content):
                    chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                             "model": model, "choices": [{"index": 0, "delta": {"content": piece},
                                                          "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def add(self, *replies: Reply) -> None:
        with self.lock:
            self.script.extend(replies)

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def paraphrases_for(request: dict, *, prefix: str = "") -> Reply:
    """A well-behaved default: k distinct rewordings of the question in the prompt."""
    text = request["messages"][-1]["content"]
    if '"score"' in request["messages"][0]["content"]:
        return Reply(json.dumps({"score": 0.9}))
    if "Question: " in text:
        question = text.split("Question: ", 1)[1].split("\n", 1)[0].rstrip("?")
        k = int(re.search(r"Write (?:up to )?(\d+)", text).group(1))
        styles = ["Could you please tell me: {}?", "hey quick one, {} - thanks in advance",
                  "I'm planning ahead and was wondering: {}?", "Excuse me, {}? Asking for my grandmother.",
                  "Good afternoon! My question is {}?", "Tell me {}, because I need to know today",
                  "Dear team, I would like to know {}.", "Short question from a new customer: {}?"]
        return Reply(json.dumps({"questions": [f"{prefix}" + s.format(question.lower()) for s in styles[:k]]}))
    k = int(re.search(r"Write (?:up to )?(\d+)", text).group(1))
    topics = ["Do you ship pallets to Norway?", "Can I pay with a gift card?", "Is insurance included for laptops?",
              "What are your opening hours on holidays?", "How do I print a return label?"]
    return Reply(json.dumps({"pairs": [{"question": prefix + t, "answer": f"Answer {i}."}
                                       for i, t in enumerate(topics[:k])]}))


def nearest_answer(request: dict) -> Reply:
    """A model that answers with the last example answer in its prompt (few-shot puts the nearest one last)."""
    shown = [m["content"] for m in request["messages"] if m["role"] == "assistant"]
    return Reply(shown[-1] if shown else "I can help with that.")
