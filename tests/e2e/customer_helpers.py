"""The bot as customers meet it in tests: the real Application in-process, answering through a model server."""

from __future__ import annotations

from inprocess import InProcessBot


def customer_bot(emulator, data_dir, llm, **settings) -> InProcessBot:
    """The real Application in-process, answering through `llm` (tests/fake_openai.py); retrieval by n-grams only,
    so which questions are "unknown" does not depend on the default embedder."""
    return InProcessBot(emulator, data_dir, inference_backend="openai", inference_base_url=llm.base_url,
                        base_model="fake-model", embedding_model="", **settings)


def business_connection(emu, connection_id: str, owner: dict, *, enabled: bool = True, can_reply: bool = True) -> None:
    """The owner connects (or changes, or disconnects) the bot in Telegram's settings → Business → Chatbots."""
    emu.post("/userUpdate", {"token": emu.token, "update": {"business_connection": {
        "id": connection_id, "user": owner, "user_chat_id": owner["id"], "is_enabled": enabled,
        "rights": {"can_reply": can_reply}}}})


def business_message(emu, connection_id: str, chat_user: dict, sender: dict, text: str) -> int:
    """A message in the business account's chat with `chat_user` (sent by them, or by the account's owner);
    returns the history mark before it."""
    mark = emu.last_message_id()
    emu.post("/userUpdate", {"token": emu.token, "update": {"business_message": {
        "business_connection_id": connection_id, "from": sender, "text": text,
        "chat": {"id": chat_user["id"], "type": "private", "first_name": chat_user["first_name"]}}}})
    return mark
