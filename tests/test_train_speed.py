"""The training fast path computes exactly what transformers + peft compute, and is undone afterwards."""

import pytest

torch = pytest.importorskip("torch")


def _lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero so the LoRA path matters in the loss and the gradients of A
            torch.nn.init.normal_(p, std=0.05)
    model.config.use_cache = False
    return model, tok


def _loss_and_grads(model, row):
    from tuning.training.model import row_loss

    model.zero_grad(set_to_none=True)
    loss, n = row_loss(model, row, torch.device("cpu"))
    (loss / n).backward()
    return float(loss), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_fast_path_matches_plain_loss_and_gradients(tiny_model_dir):
    from tuning.data.dataset import encode_items, items_from_pairs, pack
    from tuning.training.speed import fast_training, segment_bounds

    model, tok = _lora_model(tiny_model_dir)
    pairs = [("What is x?", "x is a letter."), ("How long does delivery take?", "Three days, depending on the route."),
             ("Q3", "A"), ("Do you ship abroad?", "Yes, to 40 countries.")]
    row = pack(encode_items(tok, items_from_pairs(pairs)), batch_tokens=100_000)[0]
    assert row.n_examples == 4 and len(segment_bounds(row.position_ids)) == 5
    plain_loss, plain_grads = _loss_and_grads(model, row)
    with fast_training(model):
        assert model.config._attn_implementation == "tunebot_packed"
        fused = [m for m in model.modules() if "forward" in vars(m)]
        assert len(fused) == 2 * 7  # every LoRA linear of the 2 layers
        fast_loss, fast_grads = _loss_and_grads(model, row)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain_grads.keys() == fast_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, fast_grads[name], rtol=1e-4, atol=1e-6), name
    # undone: plain attention with a mask again, peft's own forward
    assert model.config._attn_implementation == "sdpa"
    assert not [m for m in model.modules() if "forward" in vars(m)]


def test_packed_attention_keeps_examples_apart(tiny_model_dir):
    from tuning.data.dataset import encode_items, items_from_pairs, pack
    from tuning.training.model import row_loss
    from tuning.training.speed import fast_training

    model, tok = _lora_model(tiny_model_dir)
    enc = encode_items(tok, items_from_pairs([("First question?", "First answer."), ("Second?", "Second answer.")]))
    packed = pack(enc, batch_tokens=100_000)[0]
    alone = pack(enc[1:], batch_tokens=100_000)[0]
    with fast_training(model), torch.no_grad():
        both, n_both = row_loss(model, packed, torch.device("cpu"))
        first, n_first = row_loss(model, pack(enc[:1], batch_tokens=100_000)[0], torch.device("cpu"))
        second, n_second = row_loss(model, alone, torch.device("cpu"))
    assert n_both == n_first + n_second
    assert float(both) == pytest.approx(float(first) + float(second), rel=1e-5)
