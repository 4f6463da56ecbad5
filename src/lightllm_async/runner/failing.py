"""`--fail-after-steps N` (a test hook): a runner whose device fails after N steps.

It wraps the real runner, so the engine's hot loop carries no test branch.
"""

from __future__ import annotations

from typing import Any

from lightllm_async.batch import Batch, DeviceFailure, Sampled


class FailingRunner:
    """Delegates to `runner` until step `after_steps`, then raises DeviceFailure on every launch."""

    def __init__(self, runner: Any, after_steps: int):
        self.runner = runner
        self.after_steps = after_steps
        self.num_kv_tokens = runner.num_kv_tokens

    def launch(self, batch: Batch) -> Any:
        if batch.step > self.after_steps:
            raise DeviceFailure(f"injected device failure at step {batch.step}")
        return self.runner.launch(batch)

    def collect(self, handle: Any) -> Sampled:
        return self.runner.collect(handle)
