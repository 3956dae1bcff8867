"""The bot as customers meet it in tests: the real Application in-process, answering through a model server."""

from __future__ import annotations

from inprocess import InProcessBot


def customer_bot(emulator, data_dir, llm, **settings) -> InProcessBot:
    """The real Application in-process, answering through `llm` (tests/fake_openai.py); retrieval by n-grams only,
    so which questions are "unknown" does not depend on the default embedder."""
    return InProcessBot(emulator, data_dir, inference_backend="openai", inference_base_url=llm.base_url,
                        base_model="fake-model", embedding_model="", **settings)
