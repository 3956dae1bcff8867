"""Property: whatever JSON (or bytes) a client posts, the API answers in OpenAI's shape and never with a 500."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from inference_helpers import ServerThread, make_random_adapter
from storage import Store, open_db
from tuning.answering.api import create_api_app
from tuning.answering.engine import Engine

OK = {200, 400, 401, 403, 404, 413}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("api-fuzz")
    store = Store(open_db(root / "tunebot.db"))
    acme = store.create_assistant("acme", system_prompt="You answer for ACME.", owner_id=1)
    store.create_assistant("globex", owner_id=2)
    store.add_example(acme.id, "Where is the depot?", "In Utrecht.")
    adapter = make_random_adapter(tiny_model_dir, root / "acme-v1", seed=3)
    store.activate_version(store.add_model_version(acme.id, adapter_path=adapter, base_model=tiny_model_dir).id)
    _, key = store.create_api_key(acme.id)
    engine = Engine(tiny_model_dir, max_new_tokens=3)
    with ServerThread(create_api_app(store, engine, max_body_bytes=20_000, max_tokens_limit=3)) as running:
        with httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            yield {"http": http, "root": str(root), "engine": engine}
    engine.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
models = st.sampled_from(["acme", "acme:base", "acme:fewshot", "acme:tuned", "acme:grounded", "acme:v1",
                          "acme:v999999", "acme:v" + "9" * 30, "globex", "nobody", ""]) | st.text(max_size=30)
plausible_models = st.sampled_from(["acme", "acme", "acme:base", "acme:fewshot", "acme:v1"]) | models
contents = st.text(max_size=60) | st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url"]) | st.text(max_size=5), "text": st.text(max_size=20) | json_values}),
    max_size=3) | json_values
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]) | json_values,
     "content": contents}), max_size=4) | json_values
numbers = st.none() | st.integers(-5, 10) | st.integers() | st.floats() | st.booleans() | json_values
requests = st.fixed_dictionaries({"model": models, "messages": messages}, optional={
    "max_tokens": numbers, "max_completion_tokens": numbers, "temperature": numbers,
    "stream": st.booleans() | json_values, "n": numbers, "user": json_values})
turns = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer"]),
                                        "content": st.text(max_size=40)}), max_size=3)
plausible = st.fixed_dictionaries(  # mostly valid: these reach the store, the planner and the engine
    {"model": plausible_models, "messages": st.tuples(turns, st.text(min_size=1, max_size=60)).map(
        lambda t: [*t[0], {"role": "user", "content": t[1]}])},
    optional={"max_tokens": st.integers(1, 5), "temperature": st.floats(0, 2), "stream": st.booleans()})
raw = st.sampled_from([b"", b"{", b"[" * 100_000, b'{"model": "acme", "max_tokens": 1' + b"0" * 5000 + b"}",
                       b'{"model": "acme", "messages": [{"role": "user", "content": "\\ud800"}]}',
                       b'{"model": "acme", "temperature": NaN, "messages": [{"role": "user", "content": "hi"}]}',
                       "{\"model\": \"\u00e9\"}".encode("latin-1")]) | st.binary(max_size=200)


@settings(max_examples=250, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(body=st.one_of(*[plausible] * 4, requests, json_values).map(lambda v: json.dumps(v).encode()) | raw)
def test_random_bodies_never_get_a_server_error(server, body):
    reply = server["http"].post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    event(f"status {reply.status_code}")
    assert reply.status_code in OK, (reply.status_code, reply.text[:500])
    assert server["root"] not in reply.text
    if reply.status_code != 200:
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    elif reply.headers["content-type"].startswith("text/event-stream"):
        assert reply.text.rstrip().endswith("data: [DONE]") and '"error"' not in reply.text
    else:
        assert reply.json()["object"] == "chat.completion"


def test_the_engine_is_idle_after_the_fuzzing(server):
    import time

    deadline = time.monotonic() + 30
    while server["engine"].in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server["engine"].in_flight == 0
