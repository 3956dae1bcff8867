"""Training fast path: per-example attention inside packed rows and fused LoRA linears.

Both are exact rewrites of what transformers + peft compute (same parameters, same math, only fewer
and better-shaped kernels), switched on for the training loop only by `fast_training(model)`:

- packed attention: transformers gives a packed row one causal attention over the whole row with a
  block-diagonal mask, so a row of 8 examples computes 8x the needed attention scores. Here each
  example (a run of position ids starting at 0) gets its own causal attention; no mask is built.
- fused LoRA: peft computes `base(x) + lora_B(lora_A(x)) * scaling` as five kernels and autograd
  nodes, two of them elementwise passes over the full activation. Here one autograd function does
  `x W^T + s (x A^T) B^T` with addmm (the scale lands on the rank-r side) and a hand-written backward
  that skips the gradients nobody needs (frozen base weight, inputs of the first layer).
"""

from __future__ import annotations

import contextlib
import types

PACKED_ATTENTION = "tunebot_packed"


def segment_bounds(position_ids) -> list[int]:
    """Start offsets of the examples in a packed row (position id 0) plus the row length."""
    starts = [i for i, p in enumerate(position_ids) if p == 0 or i == 0]
    return [*starts, len(position_ids)]


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """Causal attention per example of a packed row; plain sdpa when no example bounds are given."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if (bounds is None or attention_mask is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]
            or kwargs.get("softcap") or not getattr(module, "is_causal", True)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: share each key/value head among its query heads
        b, h, n, d = key.shape
        key = key[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)
        value = value[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)
    edges = bounds.tolist() if hasattr(bounds, "tolist") else list(bounds)
    sizes = [e - s for s, e in zip(edges[:-1], edges[1:]) if e > s]
    window = kwargs.get("sliding_window")  # Gemma 3's local layers: a token sees the `window - 1` before it

    def attend(q, k, v):
        n = q.shape[2]
        if window and n > window:  # causal and within the window (transformers' sliding_window_overlay)
            i = torch.arange(n, device=q.device)
            band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=dropout, scale=scaling)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=n > 1)

    # split (not slicing): its backward is one concatenation instead of a zero-filled copy per example
    parts = [attend(q, k, v)
             for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2))]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _lora_function():
    import torch

    class LoraLinear(torch.autograd.Function):
        """y = x W^T + b + s (x A^T) B^T with a backward that only computes the gradients needed."""

        @staticmethod
        def forward(ctx, x, weight, bias, a, b, scaling):
            x2 = x.reshape(-1, x.shape[-1])
            h = x2 @ a.t()
            out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
            out.addmm_(h, b.t(), alpha=scaling)
            ctx.save_for_backward(x2, h, weight, a, b)
            ctx.scaling = scaling
            ctx.x_shape = x.shape
            return out.view(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            x2, h, weight, a, b = ctx.saved_tensors
            need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
            g = grad.reshape(-1, grad.shape[-1])
            gh = torch.mm(g, b).mul_(ctx.scaling) if (need_x or need_a) else None
            grad_x = grad_w = grad_bias = grad_a = grad_b = None
            if need_x:
                grad_x = torch.mm(g, weight).addmm_(gh, a).view(ctx.x_shape)
            if need_w:
                grad_w = g.t() @ x2
            if need_bias:
                grad_bias = g.sum(0)
            if need_a:
                grad_a = gh.t() @ x2
            if need_b:
                grad_b = torch.mm(g.t(), h).mul_(ctx.scaling)
            return grad_x, grad_w, grad_bias, grad_a, grad_b, None

    return LoraLinear


def _fusable(module) -> str | None:
    """The adapter name when module is a plain peft LoRA linear this file can fuse, else None."""
    import torch

    try:
        from peft.tuners.lora.layer import Linear as LoraLinearLayer
    except ImportError:
        return None
    if type(module) is not LoraLinearLayer or getattr(module, "fan_in_fan_out", False):
        return None
    names = [n for n in module.active_adapters if n in module.lora_A]
    if len(names) != 1 or names[0] in getattr(module, "lora_variant", {}):
        return None
    name = names[0]
    base = module.get_base_layer()
    if type(base) is not torch.nn.Linear or not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return None
    dtypes = {base.weight.dtype, module.lora_A[name].weight.dtype, module.lora_B[name].weight.dtype}
    if len(dtypes) != 1 or module.lora_A[name].bias is not None or module.lora_B[name].bias is not None:
        return None
    return name


def _fused_forward(function, name):
    def forward(self, x, *args, **kwargs):
        base = self.get_base_layer()
        if args or kwargs or self.disable_adapters or self.merged or x.dtype != base.weight.dtype:
            return type(self).forward(self, x, *args, **kwargs)
        return function.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                              self.scaling[name])

    return forward


@contextlib.contextmanager
def fast_training(model, *, packed_attention: bool = True, fuse_lora: bool = True):
    """Within the block, model uses the packed attention (when possible) and fused LoRA linears."""
    from transformers import AttentionInterface

    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switch = packed_attention and previous == "sdpa"
    fused = []
    if fuse_lora:
        function = _lora_function()
        for module in model.modules():
            name = _fusable(module)
            if name is not None:
                module.forward = types.MethodType(_fused_forward(function, name), module)
                fused.append(module)
    if switch:
        AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
        config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        if switch:
            config._attn_implementation = previous
        for module in fused:
            del module.forward


def uses_packed_attention(model) -> bool:
    """Whether row inputs must carry the example bounds (the packed attention is on)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == PACKED_ATTENTION
