"""The composition root: builds the services from Settings, once, for the CLI and the bot."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterable

from bot.config import Settings
from storage import Store, open_db

log = logging.getLogger("tunebot.app")


@dataclass
class App:
    """Lazily built services shared by CLI commands and Telegram handlers."""

    settings: Settings
    # How an engine of a base model is made (default: from the settings). A seam for tests: one whose load()
    # waits on a threading.Event shows what a question sees while the model is still loading.
    engine_factory: Callable[[str], Any] | None = field(default=None, repr=False)
    _engines: OrderedDict = field(default_factory=OrderedDict, repr=False)  # model key -> engine, LRU first
    _engines_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @cached_property
    def store(self) -> Store:
        return Store(open_db(self.settings.database_path))

    @cached_property
    def indexes(self):
        """Each assistant's retriever over its approved examples, kept in sync and saved under the data dir."""
        from tuning.embedding import load_embedder
        from tuning.retrieval import AssistantIndexes

        s = self.settings
        return AssistantIndexes(s.data_dir / "retrieval", embedder=load_embedder(s.embedding_model,
                                                                                cache_dir=s.models_cache),
                                embed_weight=s.embedding_weight)

    @property
    def engine(self):
        """The inference engine of the default base model."""
        return self.engine_for(self.settings.base_model)

    def engine_for(self, base_model: str | None = None):
        """One engine per base model (however its name is written), built on first use and shared by every
        caller: the model in this process, or an OpenAI-compatible server when `inference_backend` is `openai`.

        At most `max_engines` are kept: beyond that the least recently used one is closed (in the background,
        after the requests it has queued), except the default model's, which callers may hold.
        """
        from tuning.models import model_key

        s = self.settings
        base_model = base_model or s.base_model
        key, default = model_key(base_model), model_key(s.base_model)
        with self._engines_lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = self._engines[key] = self._new_engine(base_model)
            self._engines.move_to_end(key)
            evicted = [k for k in self._engines if k not in (key, default)][:max(len(self._engines) - s.max_engines, 0)]
            closing = [self._engines.pop(k) for k in evicted]
        for old in closing:
            threading.Thread(target=old.close, name="tunebot-engine-close", daemon=True).start()
        return engine

    def engine_ready(self, base_model: str | None = None) -> bool:
        """Whether this base model's engine is loaded (a question now gets no loading wait); builds nothing."""
        from tuning.models import model_key

        with self._engines_lock:
            engine = self._engines.get(model_key(base_model or self.settings.base_model))
        # A remote engine has nothing to load; a local one is loaded once it has its model.
        return engine is not None and getattr(engine, "model", True) is not None

    def preload(self, base_models: Iterable[str | None] = ()) -> threading.Thread | None:
        """Load these base models' engines on a background thread, so that the first question is answered
        from a warm engine; with no models given, every assistant's (the default's first). At most
        `max_engines` (more would close each other). Nothing when `preload_models` is off."""
        s = self.settings
        if not s.preload_models:
            return None
        if not base_models:
            base_models = [s.base_model, *(a.base_model for a in self.store.list_assistants())]
        from tuning.models import model_key

        wanted = list({model_key(m or s.base_model): m or s.base_model for m in base_models}.values())
        wanted = [m for m in wanted if not self.engine_ready(m)][:s.max_engines]
        if not wanted:
            return None

        def load_all() -> None:
            for model in wanted:
                started = time.monotonic()
                try:
                    self.engine_for(model).load()
                except Exception as exc:  # the first question loads it again and shows the error to the user
                    log.warning("could not preload the base model %s: %s", model, exc)
                    continue
                log.info("base model %s loaded in %.1f s (preloaded)", model, time.monotonic() - started)

        thread = threading.Thread(target=load_all, name="tunebot-preload", daemon=True)
        thread.start()
        return thread

    def _new_engine(self, base_model: str):
        if self.engine_factory is not None:
            return self.engine_factory(base_model)
        s = self.settings
        if s.inference_backend == "openai":
            from tuning.answering.remote import RemoteEngine

            return RemoteEngine(s.inference_base_url, api_key=s.openai_api_key, model=base_model,
                                max_new_tokens=s.max_new_tokens, temperature=s.temperature)
        if s.inference_backend == "llamacpp":
            from tuning.answering.llamacpp import LlamaCppEngine

            return LlamaCppEngine(base_model, cache_dir=s.models_cache, adapter_cache_size=s.adapter_cache_size,
                                  max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                  n_threads=s.torch_threads)
        from tuning.answering.engine import Engine

        return Engine(base_model, cache_dir=s.models_cache, adapter_cache_size=s.adapter_cache_size,
                      max_new_tokens=s.max_new_tokens, temperature=s.temperature)

    def close_engines(self) -> None:
        with self._engines_lock:
            engines = list(self._engines.values())
            self._engines.clear()
        for engine in engines:
            engine.close()

    def new_worker(self, *, gpus=None, slots: int | None = None, poll: float = 0.5):
        """A job Worker from the settings (executor local or ray, artifacts store, slots)."""
        from tuning.artifacts import is_remote
        from tuning.jobs import Worker

        s = self.settings
        return Worker(s.database_path, artifacts=s.artifacts, cache_dir=s.models_cache, gpus=gpus,
                      slots=s.worker_slots if slots is None else slots, default_base_model=s.base_model,
                      auto_promote=s.auto_promote, quiet_hours=s.quiet_hours, timezone=s.timezone,
                      max_attempts=s.job_max_attempts, poll_interval=poll, executor=s.executor,
                      train_gpus=s.train_gpus,
                      ray_address=s.ray_address, log_dir=s.data_dir / "logs" if is_remote(s.artifacts) else None)


def endpoint_configured(settings: Settings) -> bool:
    """Whether a larger model (an OpenAI-compatible endpoint) is configured."""
    return bool(settings.openai_base_url or settings.openai_api_key)


def client_config(settings):
    """The generator's ClientConfig from settings."""
    from tuning.data.synthetic import ClientConfig

    return ClientConfig(base_url=settings.openai_base_url, api_key=settings.openai_api_key,
                        model=settings.generator_model, timeout_s=settings.generator_timeout_s,
                        concurrency=settings.generator_concurrency, price_per_1k_tokens=settings.price_per_1k_tokens,
                        json_schema=settings.generator_json_schema)


def configure_threads(settings: Settings) -> None:
    """Cap PyTorch's CPU threads here and in every job process started from here (OMP_NUM_THREADS).

    On a CPU box shared with other work, fewer threads than cores avoid oversubscription: small matrix
    products (a decode step) measured ~47x slower with 2 threads than with 1 while other jobs ran.
    """
    if not settings.torch_threads:
        return
    os.environ["OMP_NUM_THREADS"] = str(settings.torch_threads)  # read by torch when it is imported
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(settings.torch_threads)


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request URL, and Telegram's URLs contain the bot token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # PTB's job queue runs on APScheduler, which logs two INFO lines for every run of a repeating job (every second).
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    for name in ("apscheduler.scheduler", "apscheduler.executors.default"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DelayedRun) for f in logger.filters):
            logger.addFilter(_DelayedRun())


class _DelayedRun(logging.Filter):
    """Drops APScheduler's warnings that a busy machine delayed a run of a repeating job ("was missed by",
    "maximum number of running instances reached"): for the once-a-second polls the skipped run is what should
    happen, not a fault to report. Its other warnings and a job that raises are still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "was missed by" not in message and "maximum number of running instances reached" not in message
