"""At start the bot loads its base models in the background (TUNEBOT_PRELOAD_MODELS), and its log stays quiet."""

import logging

from bot.app import App, configure_logging
from bot.config import Settings, load_settings


def test_preloading_is_on_by_default_and_may_be_turned_off():
    assert Settings().preload_models is True
    assert load_settings({"TUNEBOT_PRELOAD_MODELS": "0"}).preload_models is False


def test_start_loads_every_assistants_base_model_without_a_question(tmp_path, tiny_model_dir):
    app = App(Settings(data_dir=tmp_path, base_model=tiny_model_dir, max_new_tokens=4))
    try:
        app.store.create_assistant("acme", owner_id=1)  # on the default model
        assert not app.engine_ready()
        thread = app.preload()
        thread.join(120)
        assert app.engine_ready() and app.engine.model is not None
        assert app.preload() is None  # nothing left to load
    finally:
        app.close_engines()


def test_preload_off_loads_nothing(tmp_path, tiny_model_dir):
    app = App(Settings(data_dir=tmp_path, base_model=tiny_model_dir, preload_models=False))
    assert app.preload() is None and app.preload([tiny_model_dir]) is None
    assert not app.engine_ready()


def test_a_model_that_cannot_load_is_logged_not_raised(tmp_path, caplog):
    app = App(Settings(data_dir=tmp_path, base_model=str(tmp_path / "no-such-model")))
    with caplog.at_level(logging.WARNING, logger="tunebot.app"):
        app.preload().join(60)
    assert "could not preload" in caplog.text and not app.engine_ready()


def test_apscheduler_logs_warnings_only(tmp_path):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        root.handlers[:] = []  # as in a fresh `tunebot run` (pytest has added its own)
        configure_logging(Settings(data_dir=tmp_path, log_level="INFO"))
        # PTB's job queue runs a repeating job every second: APScheduler's INFO lines would fill bot.log.
        for name in ("apscheduler", "apscheduler.executors.default", "apscheduler.scheduler"):
            assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
            assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
        assert logging.getLogger("tunebot.run").isEnabledFor(logging.INFO)
        # a run delayed by a busy machine is not a warning worth a log line; other warnings are
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        root.addHandler(handler)
        scheduler = logging.getLogger("apscheduler.scheduler")
        executor = logging.getLogger("apscheduler.executors.default")
        scheduler.warning('Run time of job "job-progress" was missed by 0:00:01.2')
        executor.warning('Execution of job "job-progress" skipped: maximum number of running instances reached (1)')
        executor.warning("Job store is unreachable")
        executor.error('Job "job-progress" raised an exception')
        assert [r.getMessage() for r in records] == ["Job store is unreachable",
                                                     'Job "job-progress" raised an exception']
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
