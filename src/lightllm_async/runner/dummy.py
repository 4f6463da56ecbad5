"""`--model dummy`: no weights; each step sleeps a fixed time and emits deterministic tokens.

It measures the server's own overhead (HTTP, IPC, scheduling) with the model taken out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from lightllm_async.batch import PENDING_TOKEN, Batch, Sampled, StepLogprobs, logprob_rows, logprob_top_k
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
        return Sampled(token_ids=tuple(tokens), logprobs=certain_logprobs(batch, tokens, DUMMY_VOCAB))

    @staticmethod
    def collect(handle: Sampled) -> Sampled:
        return handle

    def execute(self, batch: Batch) -> Sampled:
        return self.collect(self.launch(batch))


def certain_logprobs(batch: Batch, sampled: Sequence[int], vocab: int) -> StepLogprobs | None:
    """The log-probabilities of a runner without a model, which knows its tokens for certain:
    each token's is 0, and the top tokens after it (the next ids) are impossible (-inf)."""
    rows = logprob_rows(batch)
    if not rows:
        return None
    targets = np.array([sampled[r.sample] if r.target == PENDING_TOKEN else r.target for r in rows])
    k = logprob_top_k(batch)
    ids = (targets[:, None] + np.arange(k)) % vocab
    top = np.full((len(rows), k), -np.inf, np.float32)
    top[:, :1] = 0.0
    return StepLogprobs(np.zeros(len(rows), np.float32), ids.astype(np.int32), top)
