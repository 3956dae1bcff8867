"""Data-parallel training: one process per GPU (or per CPU slice), gradients all-reduced every step.

`launch` (called by tuning.training.train.train when a run gets several processes) starts the ranks as
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tuning import exitcodes
from tuning.errors import TrainingError

log = logging.getLogger(__name__)

EXIT_CANCELLED = exitcodes.STOPPED  # a rank stopped by SIGTERM or its launcher's death (resumable)
EXIT_TRAINING_ERROR = exitcodes.USER_ERROR  # a rank's TrainingError: the data or settings, not retried
BUCKET_NUMEL = 16 * 1024 * 1024  # gradients are all-reduced in flat buckets of at most this many values
SPEC_NAME = ".data_parallel_spec.json"


@dataclass
class Ranks:
    """This process's place in a data-parallel run; the single-process run is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    device: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of a few numbers over all ranks (float64)."""
        if self.world == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.cpu().tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank passed True."""
        return bool(self.sum([1.0 if flag else 0.0])[0]) if self.world > 1 else flag

    def sum_gradients(self, params: Sequence) -> None:
        """Replace each parameter's gradient by its sum over all ranks (missing gradients count as zero)."""
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list = []
        size = 0
        for i, p in enumerate(params):
            bucket.append(p)
            size += p.numel()
            if size >= BUCKET_NUMEL or i == len(params) - 1:
                by_dtype: dict = {}
                for q in bucket:
                    by_dtype.setdefault(q.grad.dtype, []).append(q)
                for group in by_dtype.values():
                    flat = _flatten_dense_tensors([q.grad for q in group])
                    dist.all_reduce(flat)
                    for q, reduced in zip(group, _unflatten_dense_tensors(flat, [q.grad for q in group])):
                        q.grad.copy_(reduced)
                bucket, size = [], 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _comm_device(self):
        import torch

        return self.device if getattr(self.device, "type", "cpu") == "cuda" else torch.device("cpu")


def processes_for(config) -> int:
    """How many data-parallel processes a run uses: config.processes, else one per visible CUDA GPU."""
    if config.processes is not None:
        if config.processes < 1:
            raise TrainingError("processes must be at least 1")
        return config.processes
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


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
           on_progress: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
           resume: bool = True, poll_s: float = 0.2):
    """Run train() in `world_size` rank processes on this node; returns rank 0's TrainingReport."""
    from tuning.training.train import TrainingCancelled, TrainingReport

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
    read_fd, write_fd = os.pipe()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size)}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    procs: list[subprocess.Popen] = []
    messages: queue.Queue = queue.Queue()
    error: str | None = None
    reader_done = False
    first_failure: tuple[int, int] | None = None  # (rank, exit code) of the first rank seen failing

    ready = threading.Event()  # rank 0 handles SIGTERM (a stop request) only once it said so

    def handle(msg: dict) -> None:
        nonlocal error
        if msg.get("ready"):
            ready.set()
        elif "progress" in msg and on_progress:
            on_progress(msg["progress"])
        elif "error" in msg:
            error = msg["error"]

    try:
        for rank in range(world_size):
            cmd = [sys.executable, "-m", "tuning.training.distributed", "--spec", str(spec_path),
                   "--parent-pid", str(os.getpid())]
            if rank == 0:
                cmd += ["--progress-fd", str(write_fd)]
            # No preexec_fn (unsafe in a threaded parent such as a Ray worker): each rank arms its own
            # parent-death signal first thing and checks that its parent is still the launcher.
            procs.append(subprocess.Popen(cmd, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                          pass_fds=(write_fd,) if rank == 0 else ()))
        os.close(write_fd)
        write_fd = -1
        log.info("data-parallel training in %d processes (pids %s)", world_size, [p.pid for p in procs])

        def read() -> None:
            with os.fdopen(read_fd, "r", encoding="utf-8") as fp:
                for line in fp:
                    with contextlib.suppress(ValueError):
                        messages.put(json.loads(line))
            messages.put(None)

        threading.Thread(target=read, name="tunebot-dp-progress", daemon=True).start()
        signalled = False
        while True:
            with contextlib.suppress(queue.Empty):
                msg = messages.get(timeout=poll_s)
                while msg is not None:
                    handle(msg)
                    msg = messages.get_nowait()
                reader_done = True
            if should_stop and not signalled and ready.is_set() and should_stop():
                procs[0].send_signal(signal.SIGTERM)  # rank 0 tells the others at the next step
                signalled = True
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                first_failure = first_failure or failed[0]
                if all(c is not None for c in codes) or failed[0][1] != EXIT_CANCELLED:
                    break
            elif all(c == 0 for c in codes):
                break
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        _stop(procs)
        spec_path.unlink(missing_ok=True)
    with contextlib.suppress(queue.Empty):  # what rank 0 said last (progress, its error) may still be in the pipe
        while not reader_done and (msg := messages.get(timeout=2.0)) is not None:
            handle(msg)
    codes = [p.returncode for p in procs]
    if all(c == 0 for c in codes):
        return TrainingReport(**json.loads((out / "training_report.json").read_text()))
    if codes[0] == EXIT_CANCELLED:
        raise TrainingCancelled("training cancelled; run again to resume from the last checkpoint")
    if error:
        raise TrainingError(error)
    rank, code = first_failure or next((r, c) for r, c in enumerate(codes) if c != 0)
    raise RuntimeError(f"data-parallel rank {rank} of {world_size} exited with code {code}; "
                       f"the run resumes from its last checkpoint when retried")


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
    from tuning.training.train import TrainConfig, TrainingCancelled, train_rank

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
                   on_progress=lambda p: send({"progress": p}), should_stop=stop.is_set)
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
