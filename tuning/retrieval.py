"""Finding the examples a question is about: a multilingual sentence embedder (paraphrases, other languages)
blended with character n-gram TF-IDF (typos, layout, translit) plus word terms; one index per assistant, updated
incrementally and kept on disk. Without an embedder (package missing, or configured off) n-grams alone.

Hashed features (scikit-learn's HashingVectorizer) instead of a fitted vocabulary: adding or removing an example
only changes its own row and the document frequencies, so an update never refits the whole index, and the
index is stored as plain arrays (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from tuning.embedding import DEFAULT_EMBEDDER, load_embedder

log = logging.getLogger(__name__)

N_FEATURES = 2 ** 20
CHAR_WEIGHT = 0.75  # of the TF-IDF score; the rest is word terms (measured on ACME: see bench/retrieval_speed.py)
INDEX_VERSION = 2
EMBED_WEIGHT = 0.7  # share of the embedding similarity in the hybrid score (chosen on ACME and invented FAQs:
#   bench/retrieval_quality.py)
DEFAULT = object()  # "the default embedder": the bundled multilingual-e5-small when installed

# Russian keyboard layout: what a Russian word typed with the English layout on looks like, and back.
_EN = "`qwertyuiop[]asdfghjkl;'zxcvbnm,."
_RU = "ёйцукенгшщзхъфывапролджэячсмитьбю"
_TO_RU = str.maketrans(_EN + _EN.upper(), _RU + _RU.upper())
_TO_EN = str.maketrans(_RU + _RU.upper(), _EN + _EN.upper())
_TRANSLIT = {"а": "a", "б": "b", "в": "v", "г": "g", "д": "d", "е": "e", "ё": "e", "ж": "zh", "з": "z", "и": "i",
             "й": "i", "к": "k", "л": "l", "м": "m", "н": "n", "о": "o", "п": "p", "р": "r", "с": "s", "т": "t",
             "у": "u", "ф": "f", "х": "h", "ц": "ts", "ч": "ch", "ш": "sh", "щ": "sch", "ъ": "", "ы": "y", "ь": "",
             "э": "e", "ю": "yu", "я": "ya"}


def translit(text: str) -> str:
    """Cyrillic spelled in Latin letters the way people type it without a Russian keyboard."""
    return "".join(_TRANSLIT.get(ch, ch) for ch in text.lower())


def has_cyrillic(text: str) -> bool:
    return any("\u0400" <= ch <= "\u04ff" for ch in text)


def query_forms(question: str) -> list[str]:
    """The question as typed, plus what it would be with the other keyboard layout (only when that makes sense)."""
    forms = [question]
    letters = [ch for ch in question if ch.isalpha()]
    if letters and not has_cyrillic(question):
        forms.append(question.lower().translate(_TO_RU))  # "ntktajy" -> "телефон"
    return forms


def document_text(question: str, answer: str) -> str:
    """What an example is indexed by: its question and answer, and for Cyrillic text its transliteration too."""
    text = f"{question}\n{answer}"
    return f"{text}\n{translit(text)}" if has_cyrillic(text) else text


@dataclass(frozen=True)
class Doc:
    """One indexed example: key (the example id as text, or a file's line), question, answer, family group."""

    key: str
    question: str
    answer: str
    group: str = ""

    @property
    def digest(self) -> str:
        return hashlib.sha1(f"{self.question}\x00{self.answer}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Hit:
    """A retrieved example and how similar it is to the question: score (the hybrid, 0..1) ranks, similarity (the
    embedding's cosine alone; the score without an embedder) tells whether the question is about it at all."""

    key: str
    question: str
    answer: str
    group: str
    score: float
    similarity: float | None = None

    @property
    def example_id(self) -> int | None:
        return int(self.key) if self.key.isdigit() else None


def _vectorizers():
    from sklearn.feature_extraction.text import HashingVectorizer

    common = {"n_features": N_FEATURES, "alternate_sign": False, "norm": None, "lowercase": True, "dtype": "float32"}
    return (HashingVectorizer(analyzer="char_wb", ngram_range=(3, 5), **common),
            HashingVectorizer(analyzer="word", token_pattern=r"(?u)\b\w+\b", **common))


def _normalize_answer(text: str) -> str:
    return " ".join(text.casefold().split())


def embedding_text(question: str, answer: str) -> str:
    """What an example is embedded as (a passage): its question and answer."""
    return f"{question}\n{answer}"


class Retriever:
    """Embedding cosine blended with TF-IDF over hashed character 3-5-grams and words of question + answer; best
    first. embedder: an tuning.embedding.Embedder, None for n-grams only, DEFAULT for the bundled one."""

    def __init__(self, docs: Iterable[Doc] = (), *, embedder=DEFAULT, embed_weight: float = EMBED_WEIGHT):
        self.embedder = load_embedder(DEFAULT_EMBEDDER) if embedder is DEFAULT else embedder
        self.embed_weight = embed_weight if self.embedder is not None else 0.0
        self._chars, self._words = _vectorizers()
        self.docs: list[Doc] = []
        self._tf = None  # (docs, 2 * N_FEATURES) sublinear term frequencies: chars | words
        self._emb = None  # (docs, dim) unit vectors when an embedding model is configured
        self._weighted = self._by_feature = None
        self._lock = threading.Lock()
        self.update(list(docs))

    def __len__(self) -> int:
        return len(self.docs)

    # ------------------------------------------------------------ building
    def _term_rows(self, texts: list[str]):
        import numpy as np
        import scipy.sparse as sp

        chars = self._chars.transform(texts)
        words = self._words.transform(texts)
        rows = sp.hstack([chars, words], format="csr", dtype=np.float32)
        rows.data = 1.0 + np.log(rows.data)  # sublinear tf: a repeated n-gram counts, but not linearly
        return rows

    @property
    def embedder_name(self) -> str | None:
        return self.embedder.name if self.embedder is not None else None

    def _embed_rows(self, texts: list[str], *, query: bool = False):
        import numpy as np

        encode = self.embedder.queries if query else self.embedder.passages
        vectors = np.asarray(encode(texts), dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-9)

    def update(self, docs: Sequence[Doc]) -> bool:
        """Make the index hold exactly these docs, transforming only the new or changed ones; True if it changed."""
        import numpy as np
        import scipy.sparse as sp

        with self._lock:
            old = {d.key: (i, d.digest) for i, d in enumerate(self.docs)}
            keep_rows, new_docs, order = [], [], []
            for d in docs:
                found = old.get(d.key)
                if found is not None and found[1] == d.digest:
                    keep_rows.append(found[0])
                    order.append(("old", found[0], d))
                else:
                    new_docs.append(d)
                    order.append(("new", len(new_docs) - 1, d))
            if not new_docs and len(keep_rows) == len(self.docs) and keep_rows == sorted(keep_rows):
                return False
            width = 2 * N_FEATURES
            fresh = self._term_rows([document_text(d.question, d.answer) for d in new_docs]) if new_docs else None
            fresh_emb = self._embed_rows([embedding_text(d.question, d.answer) for d in new_docs]) \
                if new_docs and self.embedder is not None else None
            parts, emb_parts = [], []
            for kind, index, _ in order:
                source = self._tf if kind == "old" else fresh
                parts.append(source[index])
                if self.embedder is not None:
                    emb_parts.append((self._emb if kind == "old" else fresh_emb)[index:index + 1])
            self.docs = [d for _, _, d in order]
            self._tf = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, width), dtype=np.float32)
            if self.embedder is not None:
                self._emb = np.vstack(emb_parts) if emb_parts else None
            self._reweight()
            return True

    def _reweight(self) -> None:
        """IDF from the current document frequencies, then unit-length rows for each half (chars, words)."""
        import numpy as np
        import scipy.sparse as sp
        from sklearn.preprocessing import normalize

        n = self._tf.shape[0]
        if n == 0:
            self._idf = None
            self._weighted = self._by_feature = None
            return
        df = np.bincount(self._tf.indices, minlength=self._tf.shape[1]).astype(np.float32)
        self._idf = (np.log((1 + n) / (1 + df)) + 1.0).astype(np.float32)  # scikit-learn's smooth idf
        weighted = self._tf.multiply(self._idf).tocsr()
        chars = normalize(weighted[:, :N_FEATURES]) * CHAR_WEIGHT
        words = normalize(weighted[:, N_FEATURES:]) * (1 - CHAR_WEIGHT)
        self._weighted = sp.hstack([chars, words], format="csr")
        # features x docs: a query touches only the rows of its own n-grams (an inverted index)
        self._by_feature = self._weighted.T.tocsr()

    def _query_vectors(self, texts: list[str]):
        import scipy.sparse as sp
        from sklearn.preprocessing import normalize

        rows = self._term_rows(texts).multiply(self._idf).tocsr()
        return sp.hstack([normalize(rows[:, :N_FEATURES]) * CHAR_WEIGHT,
                          normalize(rows[:, N_FEATURES:]) * (1 - CHAR_WEIGHT)], format="csr")

    # ------------------------------------------------------------ searching
    def scores(self, question: str):
        """Similarity of the question to every doc (the n-grams: the best of its keyboard-layout forms)."""
        return self._scores(question)[0]

    def _scores(self, question: str):
        """(hybrid scores, embedding cosines or None) of the question against every doc."""
        import numpy as np

        if self._weighted is None:
            return np.zeros(0, dtype=np.float32), None
        best = (self._query_vectors(query_forms(question)) @ self._by_feature).toarray().max(axis=0)
        if self.embedder is None or self._emb is None:
            return best, None
        cosine = np.clip(self._emb @ self._embed_rows([question], query=True)[0], 0.0, 1.0)
        return (1 - self.embed_weight) * best + self.embed_weight * cosine, cosine

    def search(self, question: str, k: int = 4, *, distinct_answers: bool = True,
               exclude: Callable[[Doc], bool] | None = None) -> list[Hit]:
        """The k most similar docs, best first; a family (an example and its variations) and docs sharing an
        answer count once, by their best-scoring wording."""
        import numpy as np

        scores, cosine = self._scores(question)
        if scores.size == 0 or k <= 0:
            return []
        hits, seen = [], set()
        for index in np.argsort(-scores, kind="stable"):
            doc = self.docs[index]
            if exclude is not None and exclude(doc):
                continue
            answer = _normalize_answer(doc.answer)
            family = ("family", doc.group) if doc.group else answer
            if distinct_answers and (answer in seen or family in seen):
                continue
            seen.update((answer, family))
            hits.append(Hit(key=doc.key, question=doc.question, answer=doc.answer, group=doc.group,
                            score=float(scores[index]),
                            similarity=None if cosine is None else float(cosine[index])))
            if len(hits) == k:
                break
        return hits

    # ------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> None:
        """docs.jsonl and the term-frequency matrix (npz), written to a temporary folder and then swapped in."""
        import numpy as np
        import scipy.sparse as sp

        from tuning.artifacts import atomic_dir

        with atomic_dir(folder) as tmp:
            with open(tmp / "docs.jsonl", "w", encoding="utf-8") as fp:
                for d in self.docs:
                    fp.write(json.dumps({"key": d.key, "question": d.question, "answer": d.answer,
                                         "group": d.group}, ensure_ascii=False) + "\n")
            if self._tf is not None:
                sp.save_npz(tmp / "terms.npz", self._tf)
            if self._emb is not None:
                np.save(tmp / "embeddings.npy", self._emb)
            (tmp / "meta.json").write_text(json.dumps({"version": INDEX_VERSION, "n": len(self.docs),
                                                       "n_features": N_FEATURES, "char_weight": CHAR_WEIGHT,
                                                       "embedder": self.embedder_name,
                                                       "embed_weight": self.embed_weight}))

    @classmethod
    def load(cls, folder: str | Path, *, embedder=DEFAULT, embed_weight: float | None = None) -> "Retriever":
        """An index saved by save(); a missing, older or damaged one, or one built with another embedder than the
        given one, raises FileNotFoundError or ValueError. With DEFAULT, the embedder (and weight) it was built
        with; when that one cannot be loaded here, its n-grams alone (with a warning)."""
        import numpy as np
        import scipy.sparse as sp

        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("version") != INDEX_VERSION or meta.get("n_features") != N_FEATURES \
                or meta.get("char_weight") != CHAR_WEIGHT:
            raise ValueError("index written by another version")
        if embedder is DEFAULT:
            embedder = load_embedder(meta.get("embedder"))
            if embed_weight is None:
                embed_weight = meta.get("embed_weight", EMBED_WEIGHT)
        elif (embedder.name if embedder is not None else None) != meta.get("embedder"):
            raise ValueError("index built with another embedding model")
        embed_weight = EMBED_WEIGHT if embed_weight is None else embed_weight
        docs = []
        with open(folder / "docs.jsonl", encoding="utf-8") as fp:
            for line in fp:
                row = json.loads(line)
                docs.append(Doc(key=row["key"], question=row["question"], answer=row["answer"],
                                group=row.get("group", "")))
        retriever = cls(embedder=embedder, embed_weight=embed_weight)
        if docs:
            tf = sp.load_npz(folder / "terms.npz").tocsr().astype(np.float32)
            if tf.shape != (len(docs), 2 * N_FEATURES):
                raise ValueError("index arrays do not match its documents")
            emb = None
            if embedder is not None:
                path = folder / "embeddings.npy"
                if not path.exists():
                    raise ValueError("index has no embeddings for the configured model")
                emb = np.load(path, allow_pickle=False)
                if emb.shape[0] != len(docs):
                    raise ValueError("index embeddings do not match its documents")
            retriever.docs, retriever._tf, retriever._emb = docs, tf, emb
            retriever._reweight()
        return retriever


def docs_from_pairs(pairs: Iterable[tuple[str, str]]) -> list[Doc]:
    """Docs for plain pairs (a training file): keyed by line, each its own family."""
    return [Doc(key=f"p{i}", question=q, answer=a, group=f"p{i}") for i, (q, a) in enumerate(pairs)]


def docs_from_store(store, assistant_id: int) -> list[Doc]:
    """The assistant's approved examples that may be shown (train split; val and test stay unseen)."""
    from tuning.data.dataset import items_from_store

    items = items_from_store(store, assistant_id)
    return [Doc(key=str(i.example_id), question=i.question, answer=i.answer, group=i.group)
            for i in items if i.split == "train" and i.example_id is not None]


class AssistantIndexes:
    """One retriever per assistant, kept in sync with its approved examples and saved under the data dir."""

    def __init__(self, root: str | Path | None, *, embedder=DEFAULT, embed_weight: float = EMBED_WEIGHT):
        self.root = Path(root) if root else None
        self.embedder = load_embedder(DEFAULT_EMBEDDER) if embedder is DEFAULT else embedder
        self.embed_weight = embed_weight
        self._cache: dict[int, tuple[str, Retriever]] = {}
        self._lock = threading.Lock()

    def folder(self, assistant_id: int) -> Path | None:
        return self.root / f"assistant_{assistant_id}" if self.root else None

    def get(self, store, assistant_id: int) -> Retriever:
        """The assistant's retriever, updated first if its examples changed since it was last used."""
        signature = store.examples_signature(assistant_id)
        with self._lock:
            cached = self._cache.get(assistant_id)
            if cached is not None and cached[0] == signature:
                return cached[1]
            retriever = cached[1] if cached is not None else self._load(assistant_id)
            if retriever.update(docs_from_store(store, assistant_id)) and self.folder(assistant_id):
                retriever.save(self.folder(assistant_id))
            self._cache[assistant_id] = (signature, retriever)
            return retriever

    def _load(self, assistant_id: int) -> Retriever:
        folder = self.folder(assistant_id)
        if folder is not None and (folder / "meta.json").exists():
            try:
                return Retriever.load(folder, embedder=self.embedder, embed_weight=self.embed_weight)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("rebuilding the retrieval index of assistant %s: %s", assistant_id, exc)
        return Retriever(embedder=self.embedder, embed_weight=self.embed_weight)
