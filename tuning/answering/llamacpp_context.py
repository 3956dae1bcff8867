"""llama.cpp contexts over one shared model, through llama-cpp-python's C API: the model loaded once, a context
per slot of the llamacpp engine (each keeps its own adapter and KV cache), token ids in, logits out.

Each context holds several sequences (one per request decoding in it) in one unified KV cache, and keeps the
tokens each sequence's cache holds, so that the next request reuses the longest common prefix (the system
prompt, earlier turns) instead of evaluating it again.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

from tuning.answering.requests import InferenceError
from tuning.errors import ModelLoadError

log = logging.getLogger(__name__)
N_BATCH = 512  # tokens per llama_decode (longer prompts are evaluated in pieces)


def _api():
    try:
        import llama_cpp
    except ImportError as exc:
        raise ModelLoadError("the llamacpp backend needs llama-cpp-python: run `make setup` (or pip install "
                             "llama-cpp-python)") from exc
    return llama_cpp


class Model:
    """A GGUF model in llama.cpp: the weights, shared by every context made from it."""

    def __init__(self, path: Path, *, n_threads: int):
        api = _api()
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's own load chatter
        api.llama_backend_init()
        self.api, self.n_threads = api, n_threads
        self.pointer = api.llama_model_load_from_file(str(path).encode(), api.llama_model_default_params())
        if not self.pointer:
            raise ModelLoadError(f"llama.cpp cannot load {Path(path).name} (not a GGUF model, or damaged)")
        self.n_vocab = int(api.llama_vocab_n_tokens(api.llama_model_get_vocab(self.pointer)))
        self.n_ctx_train = int(api.llama_model_n_ctx_train(self.pointer))

    def context(self, *, n_ctx: int, n_seq: int) -> "Context":
        return Context(self, n_ctx=n_ctx, n_seq=n_seq)

    def load_adapter(self, path: Path):
        pointer = self.api.llama_adapter_lora_init(self.pointer, str(path).encode())
        return pointer or None

    def free_adapter(self, pointer) -> None:
        self.api.llama_adapter_lora_free(pointer)

    def close(self) -> None:
        if self.pointer:
            self.api.llama_model_free(self.pointer)
            self.pointer = None


class Context:
    """One llama.cpp context: an adapter (or none), n_seq sequences in one KV cache of n_ctx cells."""

    def __init__(self, model: Model, *, n_ctx: int, n_seq: int):
        api = self.api = model.api
        params = api.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, N_BATCH, N_BATCH
        params.n_seq_max = n_seq
        params.kv_unified = True  # the sequences share the cells: a long prompt may use most of them
        params.n_threads = params.n_threads_batch = model.n_threads
        # As llama-cpp-python's Llama sets them: its defaults here (flash attention "auto", YaRN from the
        # context default) made decoding this model many times slower on a CPU.
        params.flash_attn_type = api.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.rope_scaling_type = api.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED
        params.yarn_ext_factor, params.yarn_attn_factor = -1.0, 1.0
        params.yarn_beta_fast, params.yarn_beta_slow, params.yarn_orig_ctx = 32.0, 1.0, 0
        self.pointer = api.llama_init_from_model(model.pointer, params)
        if not self.pointer:
            raise ModelLoadError("llama.cpp could not create a context (out of memory?)")
        self.memory = api.llama_get_memory(self.pointer)
        self.model, self.n_ctx, self.n_vocab = model, n_ctx, model.n_vocab
        self.adapter: str | None = None  # the key of the adapter set on the context (None: the base model)
        self.cached: list[list[int]] = [[] for _ in range(n_seq)]  # tokens whose KV each sequence holds
        self._batch = api.llama_batch_init(N_BATCH, 0, 1)

    # ------------------------------------------------------------ adapters
    def set_adapter(self, key: str | None, pointer) -> None:
        """Decode with this adapter from now on (None: the base model); the KV cache of the old one is dropped."""
        api = self.api
        if pointer is None:
            code = api.llama_set_adapters_lora(self.pointer, None, 0, None)
        else:
            code = api.llama_set_adapters_lora(self.pointer, (api.llama_adapter_lora_p_ctypes * 1)(pointer), 1,
                                               (ctypes.c_float * 1)(1.0))
        if code != 0:
            raise InferenceError(f"llama.cpp could not apply the adapter (code {code})")
        self.adapter = key
        self.clear()

    def clear(self) -> None:
        self.api.llama_memory_clear(self.memory, False)  # the cells are forgotten; zeroing them took ~10 ms
        self.cached = [[] for _ in self.cached]

    # ------------------------------------------------------------ KV cache
    @property
    def used(self) -> int:
        """Cells the sequences' caches hold."""
        return sum(len(c) for c in self.cached)

    def common_prefix(self, seq: int, tokens: list[int]) -> int:
        n = 0
        for a, b in zip(self.cached[seq], tokens):
            if a != b:
                break
            n += 1
        return n

    def truncate(self, seq: int, length: int) -> None:
        """Keep the first `length` cached tokens of a sequence (0: forget it)."""
        if length < len(self.cached[seq]):
            if not self.api.llama_memory_seq_rm(self.memory, seq, length, -1):
                raise InferenceError("llama.cpp could not shorten a cached sequence")
            del self.cached[seq][length:]

    def adopt(self, seq: int, source: "Context", source_seq: int, length: int) -> bool:
        """Copy the KV of the first `length` cached tokens of another context's sequence (same model and
        adapter: the same values this context would compute) into this context's sequence, replacing it."""
        api = self.api
        size = api.llama_state_seq_get_size(source.pointer, source_seq)
        data = (ctypes.c_uint8 * size)()
        if not size or api.llama_state_seq_get_data(source.pointer, data, size, source_seq) != size:
            return False
        self.truncate(seq, 0)
        if not api.llama_state_seq_set_data(self.pointer, data, size, seq):
            api.llama_memory_seq_rm(self.memory, seq, 0, -1)
            return False
        self.cached[seq] = list(source.cached[source_seq])
        self.truncate(seq, length)
        return True

    # ------------------------------------------------------------ decoding
    def prefill(self, seq: int, tokens: list[int]) -> None:
        """Evaluate a prompt in a sequence after the prefix its cache shares (at least its last token, for
        fresh logits, read with logits(-1))."""
        keep = min(self.common_prefix(seq, tokens), len(tokens) - 1)
        self.truncate(seq, keep)
        rest = tokens[keep:]
        for start in range(0, len(rest), N_BATCH):
            piece = rest[start:start + N_BATCH]
            self._decode([(seq, t) for t in piece], all_logits=False)

    def step(self, feeds: list[tuple[int, int]]) -> None:
        """One token for each of several sequences, in one llama_decode; logits(i) is the i-th feed's."""
        self._decode(feeds, all_logits=True)

    def _decode(self, feeds: list[tuple[int, int]], *, all_logits: bool) -> None:
        """Feed (sequence, token) pairs; logits for every feed, or for the last one only."""
        batch = self._batch
        for i, (seq, token) in enumerate(feeds):
            batch.token[i] = token
            batch.pos[i] = len(self.cached[seq])
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1 if all_logits or i == len(feeds) - 1 else 0
            self.cached[seq].append(token)
        batch.n_tokens = len(feeds)
        code = self.api.llama_decode(self.pointer, batch)
        if code != 0:
            for seq, _ in feeds:  # what this call added is not in the cache: forget those sequences
                self.cached[seq] = []
                self.api.llama_memory_seq_rm(self.memory, seq, 0, -1)
            raise InferenceError(f"llama.cpp could not decode (code {code}"
                                 f"{': no room left in the KV cache' if code == 1 else ''})")

    def logits(self, i: int):
        """The logits of the i-th token that asked for them in the last decode (float64 numpy array)."""
        import numpy as np

        pointer = self.api.llama_get_logits_ith(self.pointer, i)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).astype(np.float64)

    def close(self) -> None:
        if self.pointer:
            self.api.llama_batch_free(self._batch)
            self.api.llama_set_adapters_lora(self.pointer, None, 0, None)
            self.api.llama_free(self.pointer)
            self.pointer = None
