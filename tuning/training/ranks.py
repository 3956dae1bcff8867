"""Where this process stands in a training run: rank 0 of 1, or one rank of a data-parallel run.

The loop (tuning.training.train) talks to the other ranks only through `Ranks`: sum a few numbers, sum the
gradients, agree on a flag, wait for each other. tuning.training.distributed starts the ranks; a single
process needs none of it, and every method is then a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tuning.errors import TrainingError

BUCKET_NUMEL = 16 * 1024 * 1024  # gradients are all-reduced in flat buckets of at most this many values


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
