"""Artifacts on a filesystem other than the local one (fsspec memory://): store, training job, inference engine."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tuning.artifacts import ArtifactError, ArtifactStore, is_remote, local_dir
from tuning.jobs.executors import run_training_job, training_spec
from jobs_helpers import add_examples, tiny_params


@pytest.fixture
def memory_url():
    """A fresh memory:// root (the memory filesystem is shared by the whole process)."""
    import fsspec

    url = f"memory://tunebot-{uuid.uuid4().hex[:8]}/artifacts"
    yield url
    fs = fsspec.filesystem("memory")
    root = url[len("memory://"):].split("/")[0]
    if fs.exists(f"/{root}"):
        fs.rm(f"/{root}", recursive=True)


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_folder_round_trips_through_memory_and_local_stores(tmp_path, memory_url):
    src = tmp_path / "src"
    (src / "checkpoints" / "last").mkdir(parents=True)
    (src / "adapter_config.json").write_text('{"r": 4}')
    (src / "checkpoints" / "last" / "state.json").write_text("{}")
    (src / "weights.bin").write_bytes(bytes(range(256)) * 1000)
    for url in (memory_url, str(tmp_path / "local-store")):
        store = ArtifactStore(url)
        assert store.remote == url.startswith("memory://") == is_remote(url)
        assert not store.exists("3/job-7")
        location = store.upload_dir(src, "3/job-7")
        assert location == store.url_for("3/job-7") == f"{url}/3/job-7"
        assert store.exists("3/job-7/checkpoints/last/state.json")
        with store.open("3/job-7/adapter_config.json", "rb") as fp:
            assert fp.read() == b'{"r": 4}'
        with store.open("3/job-7/report.md", "w") as fp:
            fp.write("# report")
        back = store.download_dir("3/job-7", tmp_path / f"back-{store.remote}")
        assert _tree(back) == {**_tree(src), "report.md": b"# report"}


def test_local_dir_caches_a_remote_folder_once(tmp_path, memory_url):
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    location = ArtifactStore(memory_url).upload_dir(src, "1/job-1")
    first = local_dir(location, cache_dir=tmp_path / "cache")
    assert first.is_relative_to(tmp_path / "cache") and (first / "adapter_config.json").read_text() == "{}"
    ArtifactStore(memory_url).upload_dir(src, "1/job-1")  # unchanged location: the cached copy is used
    assert local_dir(location, cache_dir=tmp_path / "cache") == first
    assert local_dir(str(src)) == src  # a plain path is used as it is
    with pytest.raises(ArtifactError, match="does not exist"):
        local_dir(f"{memory_url}/1/job-404", cache_dir=tmp_path / "cache")


def test_a_training_job_writes_to_a_remote_store_and_the_engine_loads_the_adapter(store, assistant, tmp_path,
                                                                                 memory_url, tiny_model_dir):
    from tuning.answering.engine import Engine

    add_examples(store, assistant.id, 6)
    job = store.create_job("train", assistant_id=assistant.id,
                           params=tiny_params(tiny_model_dir, batch_tokens=64, lora_rank=4))
    store.claim_job(worker_id="test", free=1, gpu_mode=False)
    spec = training_spec(store, store.get_job(job.id), default_base_model=tiny_model_dir)
    sent: list[dict] = []
    outcome = run_training_job(spec, artifacts=memory_url, cache_dir=None, progress_cb=sent.append,
                               should_stop=lambda: False, staging_dir=tmp_path / "staging")
    key = f"{assistant.id}/job-{job.id}"
    assert outcome["adapter_dir"] == f"{memory_url}/{key}"
    remote = ArtifactStore(memory_url)
    for name in ("adapter_model.safetensors", "adapter_config.json", "training_report.json", "loss_curve.png",
                 "checkpoints/last/state.json"):
        assert remote.exists(f"{key}/{name}"), name
    assert sent[-1]["step"] == sent[-1]["total_steps"] == outcome["metrics"]["steps"]

    # A retry on another node (an empty staging folder) fetches the checkpoints instead of starting over.
    again = run_training_job(spec, artifacts=memory_url, cache_dir=None, progress_cb=lambda p: None,
                             should_stop=lambda: False, staging_dir=tmp_path / "other-node")
    assert again["metrics"]["resumed_from_step"] == outcome["metrics"]["steps"]

    # The engine answers with the adapter from the store exactly as with a local copy of it.
    engine = Engine(tiny_model_dir, cache_dir=tmp_path / "engine-cache", max_new_tokens=6)
    try:
        from_store = engine.answer("q question number 1?", adapter_dir=outcome["adapter_dir"])
        cached = Path(engine.resident_adapters[0])
        assert cached.is_relative_to((tmp_path / "engine-cache").resolve())
        assert (cached / "adapter_model.safetensors").read_bytes() == (
            tmp_path / "staging" / key / "adapter_model.safetensors").read_bytes()
        engine.answer("q question number 2?", adapter_dir=outcome["adapter_dir"])
        assert engine.adapter_loads == 1  # downloaded and loaded once
        local = engine.answer("q question number 1?", adapter_dir=str(tmp_path / "staging" / key))
        assert from_store.text == local.text
    finally:
        engine.close()
