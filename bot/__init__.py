"""Tunebot's user interfaces and wiring: Telegram handlers, texts, the CLI, settings."""
