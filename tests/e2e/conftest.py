"""The Telegram Bot API emulator, one per test module."""

import pytest
from emulator import Emulator, EmulatorUnavailable
from fake_openai import FakeOpenAI, nearest_answer


@pytest.fixture(scope="module")
def emulator():
    try:
        emu = Emulator()
    except EmulatorUnavailable as exc:
        pytest.skip(str(exc))
    yield emu
    emu.close()


@pytest.fixture(scope="module")
def nearest_llm():
    """An OpenAI-compatible model server on loopback that answers with the nearest example in its prompt."""
    with FakeOpenAI(default=nearest_answer) as fake:
        yield fake
