"""llama.cpp's own decode loop through llama-cpp-python's C API, for issue 12's baseline.

`llama_decode` of the prompt (one call: n_batch 2048) or of one token, and greedy sampling by the C
sampler chain (`llama_sampler_sample`), as llama-cli and llama-bench drive it; no logits copied to
Python. Flash attention is left to the C default (auto: on for the CPU), the KV cache f16, the
weights mmap'd. `Llama.generate` (logits to numpy and sampling in Python each token, flash attention
off by default) measured ~8% slower in decode here (median of 8 interleaved runs):
perf/llama_cpp_variants.py, perf/RESULTS.md.
"""

from __future__ import annotations

import time

import llama_cpp as L

QUIET = L.llama_log_callback(lambda level, text, data: None)  # kept alive: the C side holds it


class LlamaLoop:
    """One model and context; prefill and decode timed the way cpu_bench.py times our server."""

    def __init__(self, path: str, threads: int, flash: int = -1, mmap: bool = True, ubatch: int = 512):
        L.llama_log_set(QUIET, None)
        mp = L.llama_model_default_params()
        mp.load_mode = L.LLAMA_LOAD_MODE_MMAP if mmap else L.LLAMA_LOAD_MODE_NONE
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = 2048, 2048, ubatch
        cp.n_threads = cp.n_threads_batch = threads
        cp.flash_attn_type = flash
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.sampler = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        L.llama_sampler_chain_add(self.sampler, L.llama_sampler_init_greedy())

    def tokenize(self, text: bytes) -> list[int]:
        buf = (L.llama_token * (len(text) + 8))()
        n = L.llama_tokenize(self.vocab, text, len(text), buf, len(buf), True, False)
        return list(buf[:n])

    def close(self) -> None:
        L.llama_sampler_free(self.sampler)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)

    def _decode(self, ids: list[int]) -> int:
        """Decode `ids` after what the context holds, then sample the next token in C."""
        arr = (L.llama_token * len(ids))(*ids)
        if L.llama_decode(self.ctx, L.llama_batch_get_one(arr, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")
        return L.llama_sampler_sample(self.sampler, self.ctx, -1)

    def _clear(self) -> None:
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        L.llama_sampler_reset(self.sampler)

    def prefill(self, ids: list[int]) -> float:
        """Seconds to decode `ids` from an empty context and sample one token."""
        self._clear()
        t0 = time.perf_counter()
        self._decode(ids)
        return time.perf_counter() - t0

    def generate(self, ids: list[int], n: int) -> float:
        """tok/s of n greedy tokens after `ids` (end-of-sequence ignored), timed from the first."""
        self._clear()
        tok = self._decode(ids)
        t0 = time.perf_counter()
        for _ in range(n - 1):
            tok = self._decode([tok])
        return (n - 1) / (time.perf_counter() - t0)
