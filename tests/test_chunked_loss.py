"""The chunked answer-only loss equals the loss of the full logits, gradients included, and never builds them."""

import pytest

torch = pytest.importorskip("torch")

VOCAB = 512


def _row(seed: int = 0):
    """A packed row of three examples: prompt tokens without loss, answer tokens with it."""
    from tuning.data.dataset import IGNORE, Encoded, pack

    g = torch.Generator().manual_seed(seed)
    encoded = []
    for prompt, answer in ((9, 5), (14, 11), (6, 3)):
        ids = torch.randint(3, VOCAB, (prompt + answer,), generator=g).tolist()
        encoded.append(Encoded(input_ids=ids, labels=[IGNORE] * prompt + ids[prompt:]))
    return pack(encoded, batch_tokens=10_000)[0]


def _model(arch: str, *, lora: bool, tied: bool = True, softcap=None):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tied, attn_implementation="sdpa")
    if arch == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(head_dim=8, sliding_window=16, final_logit_softcapping=softcap,
                                                   **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.config.use_cache = False
    if not lora:
        return model.float()
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero, so the adapters matter to the loss and to lora_A's gradients
            torch.nn.init.normal_(p, std=0.1)
    return model


def _full_logits_loss(model, row):
    """The reference: every position projected to the whole vocabulary, cross-entropy where labels are set."""
    import torch.nn.functional as F

    t = row.tensors()
    logits = model(input_ids=t["input_ids"], position_ids=t["position_ids"], use_cache=False).logits
    return F.cross_entropy(logits[0, :-1].float(), t["labels"][0, 1:], ignore_index=-100, reduction="sum")


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch, lora, tied, softcap", [
    ("llama", True, True, None),     # LoRA, as trained here
    ("llama", False, False, None),   # full fine-tuning: the projection's own gradient, untied
    ("llama", False, True, None),    # full, tied to the embeddings (the gradient reaches them both ways)
    ("gemma3", True, True, None),    # Gemma 3's architecture, as bundled:gemma3-270m
    ("gemma3", False, True, 3.0),    # a soft-capped head (Gemma 2 style), full
])
def test_chunked_loss_and_gradients_equal_the_full_logits_loss(arch, lora, tied, softcap):
    from tuning.training.model import row_loss

    model = _model(arch, lora=lora, tied=tied, softcap=softcap)
    row = _row()
    n_answer = sum(1 for x in row.labels[1:] if x != -100)
    ref_loss, ref_grads = _grads(model, lambda: _full_logits_loss(model, row))
    for chunk in (1, 4, 10_000):  # chunk boundaries inside, between and beyond the answers
        loss, grads = _grads(model, lambda: row_loss(model, row, torch.device("cpu"), chunk=chunk)[0])
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-5)
        assert grads.keys() == ref_grads.keys() and grads
        for name, grad in ref_grads.items():
            assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-5), (chunk, name)
    assert row_loss(model, row, torch.device("cpu"))[1] == n_answer


def test_evaluation_loss_without_gradients_is_the_same():
    from tuning.training.model import row_loss

    model = _model("gemma3", lora=True)
    row = _row(seed=3)
    with torch.no_grad():
        ref = float(_full_logits_loss(model, row))
        loss, _ = row_loss(model, row, torch.device("cpu"), chunk=5)
    assert not loss.requires_grad
    assert float(loss) == pytest.approx(ref, rel=1e-5)


def test_the_full_logits_are_never_built():
    """No tensor of (answer tokens x vocabulary) or more is created: the largest float tensor the lm_head
    produces is one chunk's, observed on the projection's matrix products."""
    from tuning.training.model import row_loss

    model = _model("llama", lora=True)
    row = _row(seed=1)
    n_answer = sum(1 for x in row.labels[1:] if x != -100)
    largest = []
    PRODUCTS = {"linear", "matmul", "__matmul__", "mm", "addmm", "bmm"}

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = getattr(func, "__name__", "")
            if name in PRODUCTS and isinstance(out, torch.Tensor) and out.shape[-1] == VOCAB:
                largest.append(out.numel() // VOCAB)  # rows of logits made at once
            return out

    with Watch():
        loss, _ = row_loss(model, row, torch.device("cpu"), chunk=4)
        loss.backward()
    assert largest and max(largest) <= 4 < n_answer


def test_chunked_cross_entropy_matches_cross_entropy_with_a_bias():
    import torch.nn.functional as F

    from tuning.training.loss import chunked_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (13,), generator=g)
    ref = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.5, (hidden, weight, bias))
    got = chunked_cross_entropy(hidden, weight, targets, bias=bias, chunk=3)
    got_grads = torch.autograd.grad(got * 0.5, (hidden, weight, bias))  # the incoming gradient is applied
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    for a, b in zip(got_grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        chunked_cross_entropy(hidden, weight, targets, chunk=0)


def test_gemma3_fast_path_keeps_the_sliding_window_and_the_examples_apart():
    """The training fast path (packed attention per example, fused LoRA) on Gemma 3's architecture, with an
    example longer than its sliding window: the same loss and gradients as transformers' own masking."""
    from tuning.training.model import row_loss
    from tuning.training.speed import fast_training

    model = _model("gemma3", lora=True)  # sliding_window=16; the row's second example has 25 tokens
    row = _row(seed=2)
    ref_loss, ref_grads = _grads(model, lambda: _full_logits_loss(model, row))
    with fast_training(model):
        assert model.config._attn_implementation == "tunebot_packed"
        loss, grads = _grads(model, lambda: row_loss(model, row, torch.device("cpu"), chunk=8)[0])
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-5), name
