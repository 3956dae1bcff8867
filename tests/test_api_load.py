"""A bounded load test of the API on loopback: clients mixing streaming, non-streaming, abandoned and bad
requests for a few seconds. Pass/fail never depends on the machine's speed: no 500s, every request answered
or cleanly abandoned, no generation left behind, memory roughly flat (generous limits)."""

from __future__ import annotations

import collections
import gc
import json
import random
import threading
import time

import httpx
import psutil
import pytest

from inference_helpers import ServerThread, make_random_adapter
from tuning.answering.api import create_api_app
from tuning.answering.engine import Engine

CLIENTS = 8
SECONDS = 15
WARM_UP_SECONDS = 5
MAX_REQUESTS_PER_CLIENT = 150
MEMORY_GROWTH_LIMIT_MB = 200
KINDS = ("complete", "complete", "stream", "stream", "abandon_stream", "abandon", "bad")
MODELS = ("acme", "acme:base", "acme:fewshot")


@pytest.fixture
def api(store, tiny_model_dir, tmp_path):
    acme = store.create_assistant("acme", system_prompt="You answer for ACME.", owner_id=1)
    for i in range(5):
        store.add_example(acme.id, f"Where is depot number {i}?", f"On street {i}.")
    adapter = make_random_adapter(tiny_model_dir, tmp_path / "acme-v1", seed=3)
    store.activate_version(store.add_model_version(acme.id, adapter_path=adapter, base_model=tiny_model_dir).id)
    _, key = store.create_api_key(acme.id)
    engine = Engine(tiny_model_dir, max_new_tokens=12)
    engine.load()
    with ServerThread(create_api_app(store, engine, max_tokens_limit=12)) as server:
        yield {"url": server.url, "key": key, "engine": engine, "assistant_id": acme.id}
    engine.close()


def _one(http: httpx.Client, kind: str, rng: random.Random) -> str:
    """Send one request of this kind; its outcome ("200", "400", "abandoned", …)."""
    body = {"model": rng.choice(MODELS), "max_tokens": rng.randint(1, 12),
            "messages": [{"role": "user", "content": f"Where is depot number {rng.randint(0, 9)}?"}]}
    if kind == "complete":
        reply = http.post("/v1/chat/completions", json=body)
        if reply.status_code == 200:
            assert reply.json()["choices"][0]["message"]["content"] is not None
        return str(reply.status_code)
    if kind in ("stream", "abandon_stream"):
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as reply:
            lines = []
            for line in reply.iter_lines():
                if line:
                    lines.append(line)
                if kind == "abandon_stream" and len(lines) >= 2:
                    return "abandoned"  # closing the response closes the connection mid-stream
        if reply.status_code == 200:
            assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines), lines
        return str(reply.status_code)
    if kind == "abandon":
        try:
            reply = http.post("/v1/chat/completions", json={**body, "max_tokens": 12}, timeout=rng.uniform(0.01, 0.2))
        except httpx.TimeoutException:
            return "abandoned"
        return str(reply.status_code)
    bad = rng.choice([b"{", b"[" * 50_000, json.dumps({**body, "model": "acme:v999999"}).encode(),
                      json.dumps({**body, "max_tokens": -1}).encode(), json.dumps({**body, "messages": []}).encode()])
    return str(http.post("/v1/chat/completions", content=bad).status_code)


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def _load(url: str, auth: dict, seconds: float, *, seed: int) -> tuple[collections.Counter, list[str]]:
    """CLIENTS threads sending random kinds of requests for `seconds`: (kind, outcome) counts and failures."""
    outcomes: collections.Counter = collections.Counter()
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(base_url=url, headers=auth, timeout=120) as http:
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                if time.monotonic() > deadline:
                    return
                kind = rng.choice(KINDS)
                try:
                    outcome = _one(http, kind, rng)
                except Exception as exc:  # a broken connection or a wrong answer
                    outcome = "failed"
                    with lock:
                        failures.append(f"{kind}: {type(exc).__name__}: {exc}")
                with lock:
                    outcomes[kind, outcome] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 300)
    assert not any(t.is_alive() for t in threads), "a client never finished"
    return outcomes, failures


def _settle(engine) -> None:
    deadline = time.monotonic() + 60  # abandoned generations stop at their next token
    while engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)


def test_mixed_load_gives_no_server_errors_and_leaves_nothing_behind(api, store):
    from tuning.answering.requests import Generation

    auth = {"Authorization": f"Bearer {api['key']}"}
    engine = api["engine"]
    # Warm up under the same load: the allocator's arenas and thresholds grow once, then stay.
    _load(api["url"], auth, WARM_UP_SECONDS, seed=0)
    _settle(engine)
    rss_before = _rss_mb()
    outcomes, failures = _load(api["url"], auth, SECONDS, seed=1)
    _settle(engine)
    rss_after = _rss_mb()
    total = sum(outcomes.values())
    print(f"\nload: {total} requests from {CLIENTS} clients in {SECONDS} s: {dict(sorted(outcomes.items()))}; "
          f"largest batch {engine.largest_batch}, cancelled {engine.cancellations}; "
          f"RSS {rss_before:.0f} -> {rss_after:.0f} MB")
    assert not failures, failures[:5]
    assert not {outcome for (_, outcome) in outcomes if outcome.startswith("5")}, outcomes
    assert {kind for (kind, outcome) in outcomes if outcome == "200"} >= {"complete", "stream"}
    assert all(outcome in ("400", "404") for (kind, outcome) in outcomes if kind == "bad"), outcomes
    assert total >= CLIENTS  # every client got at least one request through, however slow the machine
    assert engine.in_flight == 0 and engine._requests.empty()  # no generation queued or decoding
    assert not [o for o in gc.get_objects() if isinstance(o, Generation)]  # nor kept alive by anything
    answered = sum(n for (kind, outcome), n in outcomes.items() if kind in ("complete", "stream") and outcome == "200")
    recorded = store.db.execute("select count(*) from messages m join conversations c on c.id = m.conversation_id "
                                "where c.assistant_id = ? and m.role = 'assistant'", [api["assistant_id"]]).fetchone()[0]
    assert recorded >= answered
    assert rss_after - rss_before < MEMORY_GROWTH_LIMIT_MB
    with httpx.Client(base_url=api["url"], headers=auth, timeout=60) as http:  # still serving
        assert http.get("/health").json()["in_flight"] == 0
        assert _one(http, "complete", random.Random(1)) == "200"
