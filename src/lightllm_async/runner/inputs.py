"""A step's inputs as flat host-side index lists: the shape the device copy wants.

Kept apart from the runner so that the flattening (pure Python) reads on its own and the runner
only uploads and wraps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lightllm_async.batch import PENDING_TOKEN, Batch


@dataclass
class FlatInputs:
    """T new tokens of B requests; lists in the order they are packed for one copy."""

    ids: list[int] = field(default_factory=list)  # [T] token ids, PENDING_TOKEN where not known yet
    positions: list[int] = field(default_factory=list)  # [T]
    kv_slots: list[int] = field(default_factory=list)  # [T] cache rows receiving k/v
    token_rows: list[int] = field(default_factory=list)  # [T] each token's request-table row
    rows: list[int] = field(default_factory=list)  # [B]
    q_start: list[int] = field(default_factory=lambda: [0])  # [B + 1]
    seq_lens: list[int] = field(default_factory=list)  # [B]
    logits_idx: list[int] = field(default_factory=list)  # [S] tokens whose logits are sampled
    pending_pos: list[int] = field(default_factory=list)  # [P] inputs that are the last step's samples
    pending_src: list[int] = field(default_factory=list)  # [P] ... and which sample each one is

    def packed(self) -> tuple[list[int], list[int]]:
        """All lists concatenated, and their lengths (for `Tensor.split`)."""
        parts = [
            self.ids,
            self.positions,
            self.kv_slots,
            self.token_rows,
            self.rows,
            self.q_start,
            self.seq_lens,
            self.logits_idx,
            self.pending_pos,
            self.pending_src,
        ]
        return [x for p in parts for x in p], [len(p) for p in parts]


def flatten(batch: Batch, last_index: dict[int, int]) -> FlatInputs:
    """`last_index` maps a slot to its sample's index in the previous launch."""
    f = FlatInputs()
    for it in batch.items:
        n = len(it.token_ids)
        for j, tok in enumerate(it.token_ids):
            if tok == PENDING_TOKEN:
                f.pending_pos.append(len(f.ids) + j)
                f.pending_src.append(last_index[it.slot])
        f.ids.extend(it.token_ids)
        f.positions.extend(range(it.start, it.start + n))
        f.kv_slots.extend(it.new_kv_slots)
        f.token_rows.extend([it.row] * n)
        f.rows.append(it.row)
        f.q_start.append(f.q_start[-1] + n)
        f.seq_lens.append(it.start + n)
        if it.samples:
            f.logits_idx.append(f.q_start[-1] - 1)
    return f
