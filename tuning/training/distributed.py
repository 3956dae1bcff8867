"""Data-parallel training: one process per GPU (or per CPU slice), gradients all-reduced every step.

`launch` (called by tuning.training.run.train when a run gets several processes) starts the ranks as
`python -m tuning.training.distributed` with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...);
in each rank accelerate's PartialState reads it, opens the process group (NCCL on GPUs, gloo on
CPU) and picks the rank's device. Every rank runs the same loop on its share of each step's packed
rows; rank 0 alone writes checkpoints and results and reports progress through a pipe to the
launching process, which keeps the caller's on_progress / should_stop contract.

Why not DDP's wrapper: the step's rows are split unevenly (a rank may have none in the last step)
and the fast path patches the model's modules; one bucketed all-reduce of the adapter gradients
after the backward passes is exact (tests: 2 ranks == 1 process accumulating 2 rows) and small
(LoRA gradients are a few MB, so overlapping communication with the backward buys little).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from tuning import exitcodes
from tuning.errors import TrainingError
from tuning.training.config import TrainConfig, TrainingCancelled, TrainingReport
from tuning.training.progress import TrainProgress
from tuning.training.ranks import Ranks

log = logging.getLogger(__name__)

EXIT_CANCELLED = exitcodes.STOPPED  # a rank stopped by SIGTERM or its launcher's death (resumable)
EXIT_TRAINING_ERROR = exitcodes.USER_ERROR  # a rank's TrainingError: the data or settings, not retried
SPEC_NAME = ".data_parallel_spec.json"


# ------------------------------------------------------------------ the launching side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (a job child, a rank), so no orphan keeps a GPU busy."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(procs: Sequence[subprocess.Popen], *, grace_s: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(items, *, out_dir, config, world_size: int, system_prompt: str = "", cache_dir=None,
           on_progress: Callable[[TrainProgress], None] | None = None, should_stop: Callable[[], bool] | None = None,
           resume: bool = True, poll_s: float = 0.2):
    """Run train_rank() in `world_size` rank processes on this node; returns rank 0's TrainingReport."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / SPEC_NAME
    spec = {"items": [dataclasses.asdict(i) for i in items], "config": dataclasses.asdict(config),
            "system_prompt": system_prompt, "cache_dir": str(cache_dir) if cache_dir else None,
            "resume": resume, "out_dir": str(out)}
    fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the examples: owner only
    with os.fdopen(fd, "w", encoding="utf-8") as fp:
        json.dump(spec, fp, ensure_ascii=False)
    (out / "training_report.json").unlink(missing_ok=True)
    run = _RankProcesses(world_size, on_progress=on_progress)
    try:
        run.start(spec_path)
        run.supervise(should_stop, poll_s=poll_s)
    finally:
        run.close()
        spec_path.unlink(missing_ok=True)
    run.drain()
    codes = [p.returncode for p in run.procs]
    if all(c == 0 for c in codes):
        return TrainingReport(**json.loads((out / "training_report.json").read_text()))
    if codes[0] == EXIT_CANCELLED:
        raise TrainingCancelled("training cancelled; run again to resume from the last checkpoint")
    if run.error:
        raise TrainingError(run.error)
    rank, code = run.first_failure or next((r, c) for r, c in enumerate(codes) if c != 0)
    raise RuntimeError(f"data-parallel rank {rank} of {world_size} exited with code {code}; "
                       f"the run resumes from its last checkpoint when retried")


class _RankProcesses:
    """The launcher's side of a run: the rank processes, and rank 0's messages (ready, progress, its error)
    read from a pipe on a thread and handled on the caller's."""

    def __init__(self, world_size: int, *, on_progress: Callable[[TrainProgress], None] | None) -> None:
        self.world_size, self.on_progress = world_size, on_progress
        self.procs: list[subprocess.Popen] = []
        self.messages: queue.Queue = queue.Queue()
        self.error: str | None = None
        self.first_failure: tuple[int, int] | None = None  # (rank, exit code) of the first rank seen failing
        self.ready = threading.Event()  # rank 0 handles SIGTERM (a stop request) only once it said so
        self.reader_done = False
        self._write_fd = -1

    def start(self, spec_path: Path) -> None:
        read_fd, self._write_fd = os.pipe()
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "WORLD_SIZE": str(self.world_size), "LOCAL_WORLD_SIZE": str(self.world_size)}
        root = str(Path(__file__).resolve().parent.parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        for rank in range(self.world_size):
            cmd = [sys.executable, "-m", "tuning.training.distributed", "--spec", str(spec_path),
                   "--parent-pid", str(os.getpid())]
            if rank == 0:
                cmd += ["--progress-fd", str(self._write_fd)]
            # No preexec_fn (unsafe in a threaded parent such as a Ray worker): each rank arms its own
            # parent-death signal first thing and checks that its parent is still the launcher.
            self.procs.append(subprocess.Popen(cmd, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                               pass_fds=(self._write_fd,) if rank == 0 else ()))
        os.close(self._write_fd)
        self._write_fd = -1
        log.info("data-parallel training in %d processes (pids %s)", self.world_size, [p.pid for p in self.procs])

        def read() -> None:
            with os.fdopen(read_fd, "r", encoding="utf-8") as fp:
                for line in fp:
                    with contextlib.suppress(ValueError):
                        self.messages.put(json.loads(line))
            self.messages.put(None)

        threading.Thread(target=read, name="tunebot-dp-progress", daemon=True).start()

    def supervise(self, should_stop: Callable[[], bool] | None, *, poll_s: float) -> None:
        """Relay messages and pass a stop request on, until every rank ended well or one failed."""
        signalled = False
        while True:
            with contextlib.suppress(queue.Empty):
                msg = self.messages.get(timeout=poll_s)
                while msg is not None:
                    self._handle(msg)
                    msg = self.messages.get_nowait()
                self.reader_done = True
            if should_stop and not signalled and self.ready.is_set() and should_stop():
                self.procs[0].send_signal(signal.SIGTERM)  # rank 0 tells the others at the next step
                signalled = True
            codes = [p.poll() for p in self.procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                self.first_failure = self.first_failure or failed[0]
                if all(c is not None for c in codes) or failed[0][1] != EXIT_CANCELLED:
                    return
            elif all(c == 0 for c in codes):
                return

    def close(self) -> None:
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
        _stop(self.procs)

    def drain(self) -> None:
        """What rank 0 said last (progress, its error) may still be in the pipe."""
        with contextlib.suppress(queue.Empty):
            while not self.reader_done and (msg := self.messages.get(timeout=2.0)) is not None:
                self._handle(msg)

    def _handle(self, msg: dict) -> None:
        if msg.get("ready"):
            self.ready.set()
        elif "progress" in msg and self.on_progress:
            self.on_progress(TrainProgress.from_dict(msg["progress"]))
        elif "error" in msg:
            self.error = msg["error"]


# ------------------------------------------------------------------ one rank
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuning.training.distributed", description=__doc__)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--progress-fd", type=int)
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    die_with_parent()
    if args.parent_pid and os.getppid() != args.parent_pid:
        return EXIT_CANCELLED  # the launcher died before this rank armed its parent-death signal
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s rank %(process)d %(name)s: %(message)s")
    import datetime as dt

    import torch
    from accelerate import PartialState

    from tuning.data.dataset import TrainItem
    from tuning.errors import TuningError
    from tuning.training.train import train_rank

    spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    channel = os.fdopen(args.progress_fd, "w", encoding="utf-8", buffering=1) if args.progress_fd else None

    def send(msg: dict) -> None:
        if channel is not None:
            with contextlib.suppress(OSError, ValueError):
                channel.write(json.dumps(msg, ensure_ascii=False, default=str) + "\n")

    send({"ready": True})

    state = PartialState(cpu=not torch.cuda.is_available(), timeout=dt.timedelta(minutes=10))
    ranks = Ranks(rank=state.process_index, world=state.num_processes, device=state.device)
    try:
        train_rank([TrainItem(**i) for i in spec["items"]], out_dir=spec["out_dir"],
                   config=TrainConfig(**spec["config"]), system_prompt=spec["system_prompt"],
                   cache_dir=spec["cache_dir"], resume=spec["resume"], ranks=ranks,
                   on_progress=lambda p: send({"progress": p.to_dict()}), should_stop=stop.is_set)
    except TrainingCancelled:
        return EXIT_CANCELLED
    except TuningError as exc:
        send({"error": str(exc)})
        return EXIT_TRAINING_ERROR
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
