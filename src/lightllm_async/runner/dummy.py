"""`--model dummy`: no weights; each step sleeps a fixed time and emits deterministic tokens.

It measures the server's own overhead (HTTP, IPC, scheduling) with the model taken out.
"""

from __future__ import annotations

import time

from lightllm_async.batch import PENDING_TOKEN, Batch, Sampled
from lightllm_async.config import EngineConfig

DUMMY_VOCAB = 1000  # token ids stay below this so any tokenizer can decode them


class DummyRunner:
    """Token k of a request is (its last input token + 1) mod DUMMY_VOCAB, skipping 0..2."""

    def __init__(self, cfg: EngineConfig):
        self.step_time = cfg.dummy_step_time
        self.num_kv_tokens = max(cfg.kv_cache_tokens, cfg.max_running_requests * cfg.max_model_len)
        self._last: dict[int, int] = {}  # each request's latest sampled token, by slot

    def launch(self, batch: Batch) -> Sampled:
        if self.step_time > 0:
            time.sleep(self.step_time)
        tokens = []
        for it in batch.items:
            last = it.token_ids[-1]
            if last == PENDING_TOKEN:  # the previous step's sample, which we remember
                last = self._last[it.slot]
            if it.samples:
                self._last[it.slot] = 3 + (last + 1) % (DUMMY_VOCAB - 3)
                tokens.append(self._last[it.slot])
        return Sampled(token_ids=tuple(tokens))

    @staticmethod
    def collect(handle: Sampled) -> Sampled:
        return handle

    def execute(self, batch: Batch) -> Sampled:
        return self.collect(self.launch(batch))
