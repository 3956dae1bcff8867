"""Starting and stopping the real `tunebot run` process against the emulator."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from emulator import Emulator, emulator_env

ROOT = Path(__file__).resolve().parents[2]
TUNEBOT = [sys.executable, "-m", "bot"]


class BotProcess:
    """`tunebot run` in a subprocess; its log goes to data_dir/bot.log."""

    def __init__(self, emulator: Emulator, data_dir: Path, **env: str):
        self.emulator = emulator
        self.data_dir = data_dir
        self.env = emulator_env(emulator, data_dir, **env)
        self.log_path = data_dir / "bot.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "BotProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")
        offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen([*TUNEBOT, "run"], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        # Ready once it has polled the emulator: /getMe answered and the command menu set.
        deadline = time.monotonic() + 60
        while "Application started" not in self.log_path.read_text()[offset:]:
            if self.proc.poll() is not None:
                raise AssertionError(f"tunebot run exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"tunebot run did not start:\n{self.log()}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text()[-6000:] if self.log_path.exists() else ""
