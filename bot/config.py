"""One settings object, built from TUNEBOT_* environment variables and an optional TOML file."""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


class SettingsError(Exception):
    """A setting has a value that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """Every setting with its default; README's configuration table mirrors this class."""

    data_dir: Path = Path("./data")
    database: Path | None = None  # default: <data_dir>/tunebot.db
    base_model: str = "bundled:smollm2-135m"
    base_models: tuple[str, ...] = ()  # what /create offers besides base_model (comma-separated)
    max_engines: int = 2  # base models loaded at once; beyond that the least recently used one is closed
    preload_models: bool = True  # load each assistant's base model in the background at start and after /create
    telegram_token: str = field(default="", repr=False)
    telegram_base_url: str = ""
    telegram_drafts: bool = True  # stream answers as message drafts in private chats (else by editing a message)
    admins: tuple[int, ...] = ()
    default_language: str = "en"
    max_field_chars: int = 4000
    max_upload_mb: float = 20.0
    openai_api_key: str = field(default="", repr=False)
    openai_base_url: str = ""
    generator_model: str = "gpt-4o-mini"
    generator_concurrency: int = 4
    generator_max_requests: int = 200
    generator_max_tokens: int = 200_000
    generator_timeout_s: float = 60.0
    generator_json_schema: bool = False  # also send a JSON schema (llama.cpp server enforces it)
    generator_judge: bool = False  # score each paraphrase with the LLM judge
    price_per_1k_tokens: float = 0.0006
    mutations_per_example: int = 5
    judge_auto_approve: float = 0.0  # 0 disables auto-approval by the LLM judge
    worker_slots: int = 0  # 0: one per visible GPU, or one CPU slot
    job_max_attempts: int = 3
    train_gpus: int = 0  # GPUs per run started in Telegram or by a retraining policy (0: one on a GPU worker)
    quiet_hours: str = ""  # e.g. "09:00-18:00": training does not start then
    timezone: str = "UTC"
    auto_promote: bool = False
    unanswered_notify_minutes: float = 10.0  # batch notices of questions the assistant could not answer; 0: off
    customer_per_minute: int = 10  # questions one customer may ask one assistant a minute (a polite refusal beyond)
    customer_per_day: int = 200  # ... and in 24 hours
    adapter_cache_size: int = 8
    embedding_model: str = "bundled:multilingual-e5-small"  # or a sentence-transformers hub id or folder; "none":
    #   character n-grams only
    embedding_weight: float = 0.7  # share of the embedding similarity in the retrieval score
    max_new_tokens: int = 256
    temperature: float = 0.0
    api_host: str = "127.0.0.1"
    api_port: int = 0  # 0: `tunebot run` does not start the API
    inference_backend: str = "local"  # local (torch) | llamacpp (GGUF on llama.cpp) | openai (a server)
    inference_base_url: str = ""
    executor: str = "local"  # local | ray
    ray_address: str = ""
    artifacts_url: str = ""  # default: <data_dir>/artifacts; any fsspec URL
    log_level: str = "INFO"
    torch_threads: int = 0  # CPU threads per model process; 0: PyTorch's default (one per core)

    @property
    def offered_base_models(self) -> tuple[str, ...]:
        """The base models users may pick in Telegram's /create: the default first, then the admin's list."""
        return tuple(dict.fromkeys((self.base_model, *self.base_models)))

    @property
    def database_path(self) -> Path:
        return self.database or self.data_dir / "tunebot.db"

    @property
    def artifacts(self) -> str:
        return self.artifacts_url or str(self.data_dir / "artifacts")

    @property
    def models_cache(self) -> Path:
        return self.data_dir / "models"


# Variables outside the TUNEBOT_ prefix that the ecosystem already uses.
_ALIASES = {
    "telegram_token": ("TELEGRAM_BOT_TOKEN",),
    "openai_api_key": ("OPENAI_API_KEY",),
    "openai_base_url": ("OPENAI_BASE_URL",),
}
_CHOICES = {
    "inference_backend": ("local", "llamacpp", "openai"),
    "executor": ("local", "ray"),
    "default_language": ("en", "ru"),
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}
_SECRETS = {"telegram_token", "openai_api_key"}
# Numbers where 0 would silently break a feature (every upload too big, no answer tokens, jobs never tried).
_POSITIVE = {"max_upload_mb", "max_field_chars", "generator_concurrency", "generator_timeout_s", "job_max_attempts",
             "max_new_tokens", "adapter_cache_size", "max_engines", "customer_per_minute", "customer_per_day"}


def env_name(name: str) -> str:
    return "TUNEBOT_" + name.upper()


def _convert(name: str, typ: Any, raw: Any, source: str) -> Any:
    try:
        if typ in ("int",):
            if isinstance(raw, bool):
                raise ValueError
            value = int(raw)
        elif typ == "float":
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw)
            if not math.isfinite(value):  # nan passes every comparison below, inf every limit
                raise SettingsError(f"{source}: expected a finite number, got {raw!r}")
        elif typ == "bool":
            if isinstance(raw, bool):
                value = raw
            elif str(raw).strip().lower() in ("1", "true", "yes", "on"):
                value = True
            elif str(raw).strip().lower() in ("0", "false", "no", "off", ""):
                value = False
            else:
                raise ValueError
        elif typ in ("Path", "Path | None"):
            value = Path(str(raw)).expanduser() if str(raw) else None
            if typ == "Path" and value is None:
                raise ValueError
        elif typ == "tuple[int, ...]":
            items = raw if isinstance(raw, (list, tuple)) else [p for p in str(raw).replace(";", ",").split(",") if p.strip()]
            value = tuple(int(str(p).strip()) for p in items)
        elif typ == "tuple[str, ...]":
            items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
            value = tuple(dict.fromkeys(str(p).strip() for p in items if str(p).strip()))
        else:
            value = str(raw)
    except (TypeError, ValueError):
        kind = {"int": "a whole number", "float": "a number", "bool": "true or false",
                "tuple[int, ...]": "a comma-separated list of Telegram user ids"}.get(typ, "a valid value")
        shown = "***" if name in _SECRETS else repr(raw)
        raise SettingsError(f"{source}: expected {kind}, got {shown}") from None
    if name in _CHOICES:
        if name == "log_level":
            value = value.upper()
        if value not in _CHOICES[name]:
            raise SettingsError(f"{source}: expected one of {', '.join(_CHOICES[name])}, got {value!r}")
    if typ in ("int", "float") and value < 0:
        raise SettingsError(f"{source}: must not be negative, got {value!r}")
    if name in _POSITIVE and value <= 0:
        raise SettingsError(f"{source}: must be greater than 0, got {value!r}")
    if name == "quiet_hours" and value:
        _parse_quiet_hours(value, source)
    return value


def _parse_quiet_hours(value: str, source: str) -> None:
    """Checked with the scheduler's own parser, so a value the settings accept is one the scheduler reads."""
    from tuning.jobs.queue import JobError
    from tuning.jobs.scheduler import parse_quiet_hours

    try:
        parse_quiet_hours(value)
    except JobError:
        raise SettingsError(f"{source}: expected quiet hours like 09:00-18:00, got {value!r}") from None


def load_settings(env: Mapping[str, str] | None = None, *, config_file: str | Path | None = None) -> Settings:
    """Build Settings: defaults < TOML file (TUNEBOT_CONFIG or ./tunebot.toml) < environment."""
    env = os.environ if env is None else env
    path = config_file or env.get("TUNEBOT_CONFIG")
    file_values: dict[str, Any] = {}
    if path or Path("tunebot.toml").exists():
        path = Path(path or "tunebot.toml")
        try:
            file_values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingsError(f"TUNEBOT_CONFIG: file {str(path)!r} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{path}: not valid TOML ({exc})") from None
        file_values = file_values.get("tunebot", file_values)
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    unknown = set(file_values) - set(fields)
    if unknown:
        raise SettingsError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if name in file_values:
            values[name] = _convert(name, typ, file_values[name], f"{path}: {name}")
        for var in (env_name(name), *_ALIASES.get(name, ())):
            if var in env and (var == env_name(name) or env_name(name) not in env):
                values[name] = _convert(name, typ, env[var], var)
                break
    return Settings(**values)
