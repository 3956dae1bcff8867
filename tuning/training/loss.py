"""The causal-LM loss of the answer tokens, computed from the final hidden states in chunks of the vocabulary
projection, never materialising the (tokens x vocabulary) logits.

Why: Gemma's vocabulary has 262,144 tokens, so one 1,024-token row's logits are ~1 GB in float32, and autograd
keeps them (and their gradient) for the backward pass. Here the forward pass takes `chunk` answer positions at a
time, projects them, and right away computes both the loss and the gradient of the loss with respect to the
hidden states (and the projection's weight when it is trained): softmax - one-hot, times the weight. Only those
gradients are kept (the size of the hidden states, and of the weight when it is trained), so the backward pass
is a multiplication by the incoming scalar. The same arithmetic as projecting everything and calling
cross_entropy, with two matrix products per chunk, as autograd would do, and no recomputation.
"""

from __future__ import annotations

DEFAULT_CHUNK = 256  # answer positions per projection: 256 x 262,144 x 4 bytes = 256 MB for Gemma


def _chunked(hidden, weight, bias, targets, chunk, softcap, need_h=False, need_w=False, need_b=False):
    """(summed loss, d loss / d hidden, d loss / d weight, d loss / d bias), each gradient only where asked."""
    import torch

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start:start + chunk]
        t = targets[start:start + chunk]
        logits = (torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()).float()
        if softcap:
            capped = torch.tanh(logits / softcap)
            logits = capped * softcap
        # log-sum-exp and softmax in the logits' own memory (torch.logsumexp would take another chunk-sized copy)
        target_logit = logits.gather(1, t[:, None])[:, 0]
        top = logits.max(dim=-1, keepdim=True).values
        exp = logits.sub_(top).exp_()
        sums = exp.sum(dim=-1)
        total += (top[:, 0] + sums.log() - target_logit).sum()
        if not (need_h or need_w or need_b):
            continue
        g = exp.div_(sums[:, None])  # softmax - one-hot = d loss / d logits
        g[torch.arange(g.shape[0], device=g.device), t] -= 1.0
        if softcap:
            g.mul_(1.0 - capped * capped)
        if need_h:
            grad_h[start:start + chunk] = g.to(weight.dtype) @ weight
        if need_w:
            grad_w.addmm_(g.t(), h.float())
        if need_b:
            grad_b += g.sum(0)
    return total, grad_h, grad_w, grad_b


def _function():
    import torch

    class ChunkedCrossEntropy(torch.autograd.Function):
        """sum over rows of cross_entropy(softcap(hidden @ weight^T + bias), targets), in chunks of rows."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, chunk, softcap):
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            total, grad_h, grad_w, grad_b = _chunked(hidden, weight, bias, targets, chunk, softcap,
                                                     need_h, need_w, need_b)
            ctx.save_for_backward(grad_h, grad_w, grad_b)
            ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
            return total

        @staticmethod
        def backward(ctx, grad_out):
            grad_h, grad_w, grad_b = ctx.saved_tensors
            w_dtype, b_dtype = ctx.dtypes
            return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                    None if grad_w is None else (grad_w * grad_out).to(w_dtype),
                    None if grad_b is None else (grad_b * grad_out).to(b_dtype), None, None, None)

    return ChunkedCrossEntropy


_FUNCTION: list = []


def chunked_cross_entropy(hidden, weight, targets, *, bias=None, chunk: int = DEFAULT_CHUNK,
                          softcap: float | None = None):
    """Summed cross-entropy of `targets` (n,) under the logits `hidden (n, d) @ weight (V, d)^T (+ bias)`,
    optionally soft-capped (Gemma 2's `final_logit_softcapping`), projecting `chunk` rows at a time."""
    import torch

    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    tracked = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    if not tracked:  # evaluation: the loss only, no gradients computed
        return _chunked(hidden, weight, bias, targets, chunk, softcap or None)[0]
    if not _FUNCTION:
        _FUNCTION.append(_function())
    return _FUNCTION[0].apply(hidden, weight, bias, targets, chunk, softcap or None)


def output_projection(model):
    """(the causal LM under any peft wrapper, its decoder, its lm_head Linear, the logit soft-cap or None), or None
    for a model this cannot split (the caller then uses the model's own logits)."""
    import torch

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(causal, "get_decoder", None)
    head = causal.get_output_embeddings() if hasattr(causal, "get_output_embeddings") else None
    decoder = get_decoder() if get_decoder is not None else None
    if decoder is None or decoder is causal or type(head) is not torch.nn.Linear:
        return None  # e.g. LoRA on lm_head itself (a peft layer), or no separate decoder
    config = getattr(causal, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "logit_scale", None) not in (None, 1, 1.0):
        return None  # Cohere-style scaled logits: not this function's arithmetic
    return causal, decoder, head, getattr(text_config, "final_logit_softcapping", None)
