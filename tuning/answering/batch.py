"""A batch of the torch engine: the requests decoded together on one adapter, their KV cache left-padded to one
length with a mask of the real tokens; requests join it after their own prefill and leave it when done."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from tuning.answering.requests import Detokenizer, Generation


def stackable_cache(model) -> bool:
    """Whether the model's KV cache is plain growing tensors (no sliding window), so rows can be padded and stacked."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a model whose cache transformers builds differently: serve its requests one at a time
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


@dataclass
class Row:
    """A request inside the running batch: the token it feeds next and at which position."""

    generation: Generation
    detok: Detokenizer
    last: int = 0
    position: int = 0


class Batch:
    """Requests decoded together on one adapter: one KV cache, left-padded, with a mask of the real tokens."""

    def __init__(self, adapter_dir: str | None):
        self.adapter_dir = adapter_dir
        self.rows: list[Row] = []
        self.cache = None
        self.mask = None  # (rows, cache length) long: 1 where a row has a real token
        self.context = contextlib.ExitStack()

    def stack(self, cache, n: int, device) -> None:
        """Add a prefilled cache of n tokens: both left-padded with zeros to the longer length."""
        import torch
        import torch.nn.functional as F

        mask = torch.ones(1, n, dtype=torch.long, device=device)
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        length = max(self.mask.shape[1], n)

        def pad(t, size):  # (rows, heads, time, dim) or (rows, time): zeros on the left of time
            extra = length - size
            if not extra:
                return t
            return F.pad(t, (0, 0, extra, 0)) if t.dim() == 4 else F.pad(t, (extra, 0))

        old = self.mask.shape[1]
        for mine, new in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([pad(mine.keys, old), pad(new.keys, n)])
            mine.values = torch.cat([pad(mine.values, old), pad(new.values, n)])
        self.mask = torch.cat([pad(self.mask, old), pad(mask, n)])

    def keep(self, keep: list[int]) -> None:
        """Keep only these rows, and drop the cache columns that only the others used."""
        import torch

        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(dim=0).nonzero()[0])  # leading columns that are padding in every remaining row
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
