"""Chat messages for a question: the system prompt, optional few-shot turns, the question."""

from __future__ import annotations

from typing import Sequence

# Always sent when the assistant has no system prompt of its own: without any system message,
# SmolLM2's chat template injects "You are a helpful AI assistant named SmolLM…".
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer the question briefly and accurately."


def system_message(system_prompt: str = "") -> dict:
    """The system message: the assistant's own prompt or the neutral default."""
    return {"role": "system", "content": system_prompt.strip() or DEFAULT_SYSTEM_PROMPT}


def build_messages(question: str, *, system_prompt: str = "",
                   fewshot: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """[system, (user, assistant) per few-shot pair, user question], ready for a chat template."""
    messages = [system_message(system_prompt)]
    for q, a in fewshot:
        messages.append({"role": "user", "content": q})
        messages.append({"role": "assistant", "content": a})
    messages.append({"role": "user", "content": question})
    return messages


def training_messages(question: str, answer: str, *, system_prompt: str = "") -> list[dict]:
    """One training conversation: system, question, answer."""
    return [*build_messages(question, system_prompt=system_prompt), {"role": "assistant", "content": answer}]


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """The chat template's text for messages; a model without a usable template is a one-line ModelLoadError
    (tuning.models.load_tokenizer gives template-less base models a default one)."""
    from tuning.errors import ModelLoadError

    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"{getattr(tokenizer, 'name_or_path', '') or 'this model'} has no chat template: "
                             "load it with tuning.models.load_tokenizer (which gives it a default one) or pick an "
                             "instruction-tuned model")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja2's TemplateError, or a template that raises on the roles' order
        raise ModelLoadError(f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'this model'} "
                             f"cannot render this conversation: {exc}") from exc


def encode_prompt(tokenizer, messages: list[dict]):
    """input_ids (1, n) of the chat template with the generation prompt appended."""
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
