"""Examples written out as JSONL: question/answer lines that import back the same, or OpenAI chat messages."""

from __future__ import annotations

import json
from typing import Any, Iterable, TextIO

from tuning.errors import FormatError

WRITE_FORMATS = ("jsonl", "openai")


def _pair(item: Any) -> tuple[str, str, dict]:
    if isinstance(item, tuple | list):
        return item[0], item[1], {}
    extra = {}
    split = getattr(item, "split", None)
    if split and split != "train":
        extra["split"] = split
    if getattr(item, "must_contain", None):
        extra["must_contain"] = list(item.must_contain)
    return item.question, item.answer, extra


def write_examples(examples: Iterable[Any], fp: TextIO, *, format: str = "jsonl", system_prompt: str = "") -> int:
    """Write examples as JSONL ("jsonl": question/answer; "openai": chat messages); return the count.

    Items are (question, answer) tuples or objects with .question/.answer; for "jsonl", an object's
    non-train split and must_contain are kept so that a re-import gives the same examples.
    """
    if format not in WRITE_FORMATS:
        raise FormatError(f"unknown export format {format!r}; use one of: {', '.join(WRITE_FORMATS)}",
                          code="export_format", params={"format": format, "formats": ", ".join(WRITE_FORMATS)})
    count = 0
    for item in examples:
        question, answer, extra = _pair(item)
        if format == "openai":
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            obj: dict[str, Any] = {"messages": messages}
        else:
            obj = {"question": question, "answer": answer, **extra}
        fp.write(json.dumps(obj, ensure_ascii=False) + "\n")
        count += 1
    return count
