"""`--model dummy`: no weights; each step sleeps a fixed time and emits deterministic tokens.

It measures the server's own overhead (HTTP, IPC, scheduling) with the model taken out.
"""

from __future__ import annotations

import time

from lightllm_async.batch import Batch, Sampled
from lightllm_async.config import EngineConfig

DUMMY_VOCAB = 1000  # token ids stay below this so any tokenizer can decode them


class DummyRunner:
    """Token k of a request is (its last input token + 1) mod DUMMY_VOCAB, skipping 0..2."""

    def __init__(self, cfg: EngineConfig):
        self.step_time = cfg.dummy_step_time
        self.num_kv_tokens = max(cfg.kv_cache_tokens, cfg.max_running_requests * cfg.max_model_len)

    def execute(self, batch: Batch) -> Sampled:
        if self.step_time > 0:
            time.sleep(self.step_time)
        tokens = tuple(3 + (it.token_ids[-1] + 1) % (DUMMY_VOCAB - 3) for it in batch.items if it.samples)
        return Sampled(token_ids=tokens)
