"""One question-answer pair typed in a chat message: "Q: … A: …" (also В/О, Question/Answer, Вопрос/Ответ)."""

from __future__ import annotations

import re

# The quick form of one pair in a chat message. Two small patterns searched once each, not one pattern with a
# lazy group between whitespace runs: that one backtracked for hours on "Q:" and 4,000 spaces.
_QUESTION_LABEL = re.compile(r"\s*(?:question|вопрос|q|в)\s*[:：]", re.IGNORECASE)
_ANSWER_LABEL = re.compile(r"(?<!\w)(?:answer|ответ|a|о)\s*[:：]", re.IGNORECASE)


def parse_quick_form(text: str | None) -> tuple[str, str] | None:
    """'Q: … A: …' (also В/О, Question/Answer, Вопрос/Ответ) as (question, answer), in linear time.

    The answer label is a whole word ("Домодедово:" and "data:" are not labels). When the text holds several
    ("Q: What is plan A: basic? A: Cheap."), the first one starting a line wins, else the first one after the
    end of a sentence (?, !, .), else the first one."""
    head = _QUESTION_LABEL.match(text or "")
    if not head:
        return None
    labels = [m for m in _ANSWER_LABEL.finditer(text, head.end()) if text[head.end():m.start()].strip()]
    if not labels:
        return None

    def before(m) -> str:
        return text[head.end():m.start()].rstrip(" \t")

    label = (next((m for m in labels if before(m).endswith("\n")), None)
             or next((m for m in labels if before(m).rstrip().endswith(("?", "!", ".", "？"))), None)
             or labels[0])
    question, answer = text[head.end():label.start()].strip(), text[label.end():].strip()
    return (question, answer) if answer else None
