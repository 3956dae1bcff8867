"""Where job artifacts live (adapters, reports, plots, checkpoints): a local folder or any fsspec URL.

Training always writes to a local folder; with a remote store it then syncs that folder up, and
whoever needs the files (the inference engine, an evaluation, a resumed job on another node)
downloads them into a local cache first.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tuning.errors import TuningError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_dir(folder: str | os.PathLike, *, keep_as: str | os.PathLike | None = None):
    """Write a folder's files into a temporary sibling, then swap it in: a killed process leaves the old folder
    or the new one whole, never half of each. With keep_as the folder it replaces is moved there (replacing
    what was there) instead of removed."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    old = Path(keep_as) if keep_as is not None else folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    if keep_as is None:
        shutil.rmtree(old, ignore_errors=True)


class ArtifactError(TuningError):
    """An artifact location cannot be used (bad URL, missing filesystem package, unreachable)."""


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URL other than a plain path or file://."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def _local_path(location: str | os.PathLike) -> Path:
    text = str(location)
    return Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()


class ArtifactStore:
    """A root location (path or fsspec URL); folders inside it are named by relative keys like '3/job-7'."""

    def __init__(self, url: str | os.PathLike) -> None:
        self.url = str(url).rstrip("/") or "/"
        self.remote = is_remote(self.url)
        if self.remote:
            try:
                import fsspec

                self.fs, self.root = fsspec.core.url_to_fs(self.url)
            except (ImportError, ValueError) as exc:
                raise ArtifactError(f"artifacts URL {self.url!r} cannot be used: {exc}") from exc
            self.root = self.root.rstrip("/")
        else:
            self.fs, self.root = None, str(_local_path(self.url))

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    def url_for(self, key: str = "") -> str:
        """The full location of a key: a local path, or a URL of the store's scheme."""
        key = key.strip("/")
        if not self.remote:
            return str(Path(self.root) / key) if key else self.root
        return f"{self.url}/{key}" if key else self.url

    def _path(self, key: str) -> str:
        key = key.strip("/")
        if not self.remote:
            return str(Path(self.root) / key)
        return f"{self.root}/{key}" if key else self.root

    def exists(self, key: str) -> bool:
        """Whether a file or folder exists under the key."""
        if not self.remote:
            return Path(self._path(key)).exists()
        return self.fs.exists(self._path(key))

    def open(self, key: str, mode: str = "rb", **kwargs):
        """A file object for the key (parent folders are created when writing)."""
        path = self._path(key)
        if not self.remote:
            if any(c in mode for c in "wax"):
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            return open(path, mode, **kwargs)
        return self.fs.open(path, mode, **kwargs)

    def upload_dir(self, local_dir: str | os.PathLike, key: str) -> str:
        """Copy a local folder's files to the key (overwriting); returns url_for(key)."""
        local = Path(local_dir)
        if not self.remote:
            target = Path(self._path(key))
            if target.resolve() != local.resolve():
                shutil.copytree(local, target, dirs_exist_ok=True)
            return self.url_for(key)
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = path.relative_to(local).as_posix()
            with open(path, "rb") as src, self.fs.open(f"{self._path(key)}/{rel}", "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        return self.url_for(key)

    def download_dir(self, key: str, local_dir: str | os.PathLike) -> Path:
        """Copy the files under the key into a local folder; returns it."""
        local = Path(local_dir)
        local.mkdir(parents=True, exist_ok=True)
        if not self.remote:
            src = Path(self._path(key))
            if src.resolve() != local.resolve():
                shutil.copytree(src, local, dirs_exist_ok=True)
            return local
        base = self._path(key)
        for path in self.fs.find(base):
            rel = path[len(base):].lstrip("/") if path.startswith(base) else Path(path).name
            target = local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open(path, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        return local


def split_location(location: str) -> tuple[ArtifactStore, str]:
    """(a store rooted at the parent, the last name) for a folder URL like 's3://b/art/3/job-7'."""
    parent, _, name = str(location).rstrip("/").rpartition("/")
    if not name or not parent or parent.endswith(":/"):
        raise ArtifactError(f"{location!r} does not name a folder inside a store")
    return ArtifactStore(parent), name


def local_dir(location: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder with the files of `location`: the path itself, or a cached download of a URL."""
    if not is_remote(location):
        return _local_path(location)
    cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "tunebot-artifacts"
    digest = hashlib.sha1(str(location).encode()).hexdigest()[:12]
    target = cache / "artifacts" / f"{str(location).rstrip('/').rsplit('/', 1)[-1]}-{digest}"
    done = target / ".complete"
    if done.exists():
        return target
    store, name = split_location(str(location))
    if not store.exists(name):
        raise ArtifactError(f"{location} does not exist (is the artifacts store reachable from here?)")
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    store.download_dir(name, partial)
    (partial / ".complete").write_text(str(location))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    log.info("downloaded %s to %s", location, target)
    return target
