"""What a Russian text may hold in Latin script: names, commands, file names, numbers with units, user data."""

from __future__ import annotations

import re

# Names a Russian text may carry as they are: formats, products and acronyms.
NAMES = {"JSON", "JSONL", "CSV", "UTF", "LoRA", "CPU", "GPU", "API", "Telegram", "Tunebot", "OpenAI", "HTML", "UTC",
         "GGUF", "Ollama"}


def latin_noise(text: str, user_data: list[str]) -> list[str]:
    """The Latin-script words of `text` that are none of: user data, a command, a file name, a quoted file-format
    key, a number with its unit, a name."""
    for item in sorted(user_data, key=len, reverse=True):
        text = text.replace(item, " ")
    text = re.sub(r"</?[a-z]+>", " ", text)                                        # HTML markup: <b>, <pre>
    text = re.sub(r"(?<!\w)/[a-z_]+", " ", text)                                   # /commands
    text = re.sub(r"\S+\.(?:jsonl|json|csv|tsv|txt|md|pdf|docx|png|zip|gguf)\b", " ", text)  # file names
    text = re.sub(r'"[^"\n]*"', " ", text)                                          # "question", "messages"
    text = re.sub(r"\d+(?:[.,]\d+)?\s?(?:[KMG]B|ms)\b", " ", text)                  # numbers with units
    return [word for word in re.findall(r"[A-Za-z]+", text) if word not in NAMES]
