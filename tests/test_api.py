"""The OpenAI-compatible API, driven by the official `openai` client against uvicorn on loopback."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from openai import OpenAI

from inference_helpers import ServerThread, make_random_adapter, make_random_model_like
from tuning.answering.api import create_api_app
from tuning.answering.engine import Engine
from tuning.answering.remote import RemoteEngine


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = Engine(tiny_model_dir, adapter_cache_size=2, max_new_tokens=6)
    eng.load()
    yield eng
    eng.close()


@pytest.fixture
def setup(store, engine, tiny_model_dir, tmp_path):
    acme = store.create_assistant("acme", system_prompt="You answer for ACME.", owner_id=1)
    globex = store.create_assistant("globex", owner_id=2)
    adapter = make_random_adapter(tiny_model_dir, tmp_path / "acme-v1", seed=3)
    store.activate_version(store.add_model_version(acme.id, adapter_path=adapter, base_model=tiny_model_dir).id)
    store.add_example(globex.id, "Where is Globex?", "In Springfield.")
    _, acme_key = store.create_api_key(acme.id, name="test")
    _, globex_key = store.create_api_key(globex.id)
    with ServerThread(create_api_app(store, engine, max_body_bytes=4000)) as server:
        yield {"url": server.url, "acme": acme_key, "globex": globex_key, "adapter": adapter, "acme_id": acme.id}


def client(setup, key) -> OpenAI:
    return OpenAI(base_url=setup["url"] + "/v1", api_key=key, max_retries=0, timeout=60)


def test_health(setup):
    reply = httpx.get(setup["url"] + "/health")
    assert reply.status_code == 200 and reply.json()["status"] == "ok"


def test_list_models_shows_only_the_keys_assistant(setup):
    ids = [m.id for m in client(setup, setup["acme"]).models.list()]
    assert ids == ["acme", "acme:base", "acme:fewshot"]
    assert [m.id for m in client(setup, setup["globex"]).models.list()][0] == "globex"


def test_completion_uses_the_active_adapter_and_is_recorded(setup, engine, store):
    reply = client(setup, setup["acme"]).chat.completions.create(
        model="acme", messages=[{"role": "user", "content": "Hello?"}], max_tokens=5)
    text = reply.choices[0].message.content
    expected = engine.answer("Hello?", adapter_dir=setup["adapter"], system_prompt="You answer for ACME.",
                             max_new_tokens=5).text
    assert text == expected.strip() and text  # answers are stripped, as in the chat
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 5 and reply.usage.prompt_tokens > 5
    base = client(setup, setup["acme"]).chat.completions.create(
        model="acme:base", messages=[{"role": "user", "content": "Hello?"}], max_tokens=5)
    assert base.choices[0].message.content != text
    rows = list(store.db.query("select m.text, m.mode from messages m join conversations c on c.id = m.conversation_id "
                               "where c.assistant_id = ? and m.role = 'assistant' order by m.id", [setup["acme_id"]]))
    assert rows[0] == {"text": text, "mode": "tuned"}


def test_stream_gives_the_same_text_in_chunks(setup):
    c = client(setup, setup["acme"])
    messages = [{"role": "user", "content": "What do you ship?"}]
    whole = c.chat.completions.create(model="acme", messages=messages, max_tokens=6).choices[0].message.content
    chunks = list(c.chat.completions.create(model="acme", messages=messages, max_tokens=6, stream=True))
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(pieces) >= 2 and "".join(pieces).strip() == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_missing_and_invalid_keys_are_401(setup):
    with pytest.raises(openai.AuthenticationError):
        client(setup, "tb-not-a-key").models.list()
    reply = httpx.post(setup["url"] + "/v1/chat/completions", json={"model": "acme", "messages": []})
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"


def test_keys_cannot_reach_another_assistants_models(setup):
    with pytest.raises(openai.PermissionDeniedError):
        client(setup, setup["globex"]).chat.completions.create(
            model="acme", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.PermissionDeniedError):
        client(setup, setup["acme"]).chat.completions.create(
            model="globex:fewshot", messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.NotFoundError):
        client(setup, setup["acme"]).chat.completions.create(
            model="nobody", messages=[{"role": "user", "content": "hi"}])


def test_revoked_key_is_refused(setup, store):
    key = store.lookup_api_key(setup["globex"])
    store.revoke_api_key(key.id)
    with pytest.raises(openai.AuthenticationError):
        client(setup, setup["globex"]).models.list()


def test_body_limit_and_bad_json(setup):
    auth = {"Authorization": f"Bearer {setup['acme']}"}
    with pytest.raises(openai.APIStatusError) as err:
        client(setup, setup["acme"]).chat.completions.create(
            model="acme", messages=[{"role": "user", "content": "x" * 5000}])
    assert err.value.status_code == 413
    reply = httpx.post(setup["url"] + "/v1/chat/completions", content=b"{not json", headers=auth)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_json"
    reply = httpx.post(setup["url"] + "/v1/chat/completions", headers=auth,
                       json={"model": "acme", "messages": [{"role": "assistant", "content": "hi"}]})
    assert reply.status_code == 400 and "last message" in reply.json()["error"]["message"]


def test_remote_engine_talks_to_an_openai_compatible_server(setup, engine):
    remote = RemoteEngine(setup["url"] + "/v1", api_key=setup["acme"], model="acme:base", max_new_tokens=5)
    via_server = remote.answer("Hello?")
    local = engine.answer("Hello?", max_new_tokens=5)
    assert via_server.text == local.text and via_server.n_tokens >= 1
    tuned = "".join(remote.stream("Hello?", adapter_name="acme", max_new_tokens=5))
    assert tuned == engine.answer("Hello?", adapter_dir=setup["adapter"], max_new_tokens=5).text


@pytest.fixture(scope="module")
def other_engine(tiny_model_dir, tmp_path_factory):
    """The engine of a second base model (same tokenizer, other weights)."""
    eng = Engine(make_random_model_like(tiny_model_dir, tmp_path_factory.mktemp("other-base"), seed=7), max_new_tokens=6)
    yield eng
    eng.close()


def test_each_assistant_is_answered_by_the_engine_of_its_base_model(store, engine, other_engine):
    initech = store.create_assistant("initech", base_model=other_engine.base_model, owner_id=3)
    acme = store.create_assistant("acme", owner_id=1)  # no base model of its own: the default engine
    engines = {other_engine.base_model: other_engine}
    _, initech_key = store.create_api_key(initech.id)
    _, acme_key = store.create_api_key(acme.id)
    messages = [{"role": "user", "content": "Hello?"}]
    with ServerThread(create_api_app(store, engine, engine_for=engines.__getitem__)) as server:
        def ask(key, model):
            c = OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)
            return c.chat.completions.create(model=model, messages=messages, max_tokens=5).choices[0].message.content

        initech_text, acme_text = ask(initech_key, "initech:base"), ask(acme_key, "acme:base")
    assert initech_text == other_engine.answer("Hello?", max_new_tokens=5).text.strip()
    assert acme_text == engine.answer("Hello?", max_new_tokens=5).text.strip()
    assert initech_text != acme_text


def test_unsure_answers_say_so_and_reach_the_experts(store, engine, tiny_model_dir, tmp_path):
    """A grounded version: a question unlike every example is "I don't know" (never an invented fact), recorded
    as abstained and queued as an unanswered item; a close question is answered and cites its source."""
    from tuning.answering.service import ABSTAIN_TEXT, ABSTAIN_TEXT_RU
    from tuning.grounding import Grounding
    from tuning.retrieval import AssistantIndexes

    acme = store.create_assistant("acme", system_prompt="You answer for ACME.", owner_id=1)
    example = store.add_example(acme.id, "How much does a small parcel cost?", "A small parcel costs €4.90.")
    store.add_example(acme.id, "Where is the depot?", "The depot is in Utrecht.")
    adapter = make_random_adapter(tiny_model_dir, tmp_path / "acme-v1", seed=3)
    Grounding(recipe="grounded", k=2, threshold=0.2, min_choice_probability=0.0).save(adapter)
    store.activate_version(store.add_model_version(acme.id, adapter_path=adapter, base_model=tiny_model_dir).id)
    _, key = store.create_api_key(acme.id)
    with ServerThread(create_api_app(store, engine, indexes=AssistantIndexes(tmp_path / "idx"))) as server:
        c = OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)
        unsure = c.chat.completions.create(model="acme", messages=[{"role": "user", "content": "zzqx vvkj?"}],
                                           max_tokens=5).choices[0].message.content
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="acme", messages=[{"role": "user", "content": "qqqz wwkx?"}], max_tokens=5, stream=True)
            if ch.choices)
        close = c.chat.completions.create(model="acme", messages=[{"role": "user", "content": "small parcel cost?"}],
                                          max_tokens=5).choices[0].message.content
        russian = c.chat.completions.create(model="acme", messages=[{"role": "user", "content": "щщфы жжэ?"}],
                                            max_tokens=5).choices[0].message.content
    assert unsure == ABSTAIN_TEXT and streamed == ABSTAIN_TEXT
    assert russian == ABSTAIN_TEXT_RU  # in the question's language
    assert [u.question for u in store.list_unanswered(acme.id)] == ["zzqx vvkj?", "qqqz wwkx?", "щщфы жжэ?"]
    assert close != ABSTAIN_TEXT and not close.startswith("[")  # never the citation marker
    answered = store.list_unanswered(acme.id)[0].message_id
    assert store.get_message(answered)["abstained"] == 1
    rows = [m for m in store.db["messages"].rows if m["role"] == "assistant" and not m["abstained"]]
    assert example.id in store.message_sources(rows[-1]["id"])


def _post(url: str, key: str, body, *, timeout: float = 60) -> httpx.Response:
    """A chat completion request with a raw body (bytes or text) or a JSON one."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + "/v1/chat/completions", content=content, headers=headers, timeout=timeout)


def test_prompts_longer_than_the_context_window_are_400_context_length_exceeded(store, engine):
    acme = store.create_assistant("acme", owner_id=1)
    _, key = store.create_api_key(acme.id)
    long = [{"role": "user", "content": "word " * 1100}]  # the tiny model's window is 1024 tokens
    with ServerThread(create_api_app(store, engine)) as server:
        c = OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as err:
                c.chat.completions.create(model="acme:base", messages=long, max_tokens=5, stream=stream)
            assert err.value.code == "context_length_exceeded" and "1024 tokens" in err.value.message
            assert err.value.body["param"] == "messages"
        fits = c.chat.completions.create(model="acme:base", messages=[{"role": "user", "content": "word " * 900}],
                                         max_tokens=500)
    assert fits.choices[0].finish_reason == "length"  # cut where the window ends
    assert fits.usage.prompt_tokens + fits.usage.completion_tokens == 1024


def test_odd_model_ids_and_bodies_are_4xx_never_500(setup, store, engine):
    acme_key = setup["acme"]
    with ServerThread(create_api_app(store, engine)) as server:  # the default 1 MB body limit
        def status(body):
            reply = _post(server.url, acme_key, body)
            assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
            return reply.status_code, reply.json()["error"]["code"]

        ask = [{"role": "user", "content": "hi"}]
        for model in ("acme:v999999", "acme:v" + "9" * 5000, "acme:v" + "9" * 25, "acme:v²", "acme:v-1", "acme:x"):
            assert status({"model": model, "messages": ask}) == (404, "model_not_found"), model
        assert status(b"[" * 100_000 + b"]" * 100_000) == (400, "invalid_json")
        huge = '{"model": "acme", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1%s}' % ("0" * 5000)
        assert status(huge) == (400, "invalid_json")
        assert status({"model": "acme", "messages": ask, "max_tokens": True})[0] == 400
        assert status({"model": "acme", "messages": ask, "temperature": False})[0] == 400
        parts = [{"role": "user", "content": [{"type": "text", "text": 5}]}]
        assert status({"model": "acme", "messages": parts}) == (400, "invalid_content")


def test_a_broken_adapter_is_503_without_server_paths_and_the_base_model_still_answers(store, engine, tmp_path,
                                                                                        tiny_model_dir):
    acme = store.create_assistant("acme", owner_id=1)
    _, key = store.create_api_key(acme.id)
    adapter = make_random_adapter(tiny_model_dir, tmp_path / "acme-v1", seed=3)
    (tmp_path / "acme-v1" / "adapter_model.safetensors").write_bytes(b"\0" * 100)  # damaged on disk
    store.activate_version(store.add_model_version(acme.id, adapter_path=adapter, base_model=tiny_model_dir).id)
    expected = engine.answer("Hello?", max_new_tokens=5).text.strip()
    with ServerThread(create_api_app(store, engine)) as server:
        ask = {"model": "acme", "messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 5}
        reply = _post(server.url, key, ask)
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "model_unavailable"
        streamed = _post(server.url, key, {**ask, "stream": True})  # the error comes as an event, as OpenAI's do
        assert '"error"' in streamed.text and streamed.text.rstrip().endswith("data: [DONE]")
        for text in (reply.text, streamed.text):
            assert "cannot be loaded" in text and str(tmp_path) not in text and "/tmp" not in text
        base = _post(server.url, key, {"model": "acme:base", "messages": [{"role": "user", "content": "Hello?"}],
                                   "max_tokens": 5})
    assert base.status_code == 200 and base.json()["choices"][0]["message"]["content"] == expected


def test_a_client_that_goes_away_cancels_its_generation(setup, store, engine):
    """A non-streaming request used to run to its end (minutes of CPU) after its client timed out."""
    before = engine.cancellations
    answers = store.db.execute("select count(*) from messages where role = 'assistant'").fetchone()[0]
    with ServerThread(create_api_app(store, engine, max_tokens_limit=4096)) as server:
        with pytest.raises(httpx.ReadTimeout):  # ~1,000 tokens to go: far longer than the client waits
            _post(server.url, setup["acme"], {"model": "acme:base", "messages": [{"role": "user", "content": "Go on."}],
                                          "max_tokens": 4000}, timeout=0.3)
        deadline = time.monotonic() + 30
        while (engine.in_flight or engine.cancellations == before) and time.monotonic() < deadline:
            time.sleep(0.02)
    assert engine.in_flight == 0 and engine.cancellations == before + 1
    assert store.db.execute("select count(*) from messages where role = 'assistant'").fetchone()[0] == answers


def test_health_answers_while_another_connection_holds_the_write_lock(setup, db_path):
    """Store calls run off the event loop: a request waiting for the lock (its key's last use is written)
    must not stall /health (it took the whole SQLite busy timeout, 29 s)."""
    import sqlite3
    import threading

    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    results = []
    try:
        body = {"model": "globex:base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        waiting = threading.Thread(target=lambda: results.append(_post(setup["url"], setup["globex"], body)))
        waiting.start()
        time.sleep(0.5)  # the request is in the store now, waiting for the lock
        start = time.monotonic()
        health = httpx.get(setup["url"] + "/health", timeout=10)
        elapsed = time.monotonic() - start
        assert health.status_code == 200 and elapsed < 3, elapsed
        assert waiting.is_alive()  # still waiting for the lock
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    waiting.join(60)
    assert results and results[0].status_code == 200
