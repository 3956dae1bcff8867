"""The Telegram Bot API emulator, one per test module."""

import pytest
from emulator import Emulator, EmulatorUnavailable


@pytest.fixture(scope="module")
def emulator():
    try:
        emu = Emulator()
    except EmulatorUnavailable as exc:
        pytest.skip(str(exc))
    yield emu
    emu.close()
