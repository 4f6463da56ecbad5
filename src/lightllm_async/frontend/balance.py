"""Which engine replica (--dp N) a new request goes to."""

from __future__ import annotations


class LeastOutstanding:
    """Picks the replica with the least outstanding work: the fewest requests the frontend
    submitted to it that have not finished yet. Ties go round robin, starting after the last
    pick, so that equal replicas take turns (a burst on an idle server spreads evenly).

    Why requests counted here, not the engines' waiting tokens from the region's stats: this
    count is exact and current (it includes requests still in a submit ring, which no engine has
    seen, and ends with the frontend's own read of the finish), while a stats snapshot is a step
    old, and reading every replica's seqlock on each request would cost more than the rest of the
    choice. A request's size is not weighed: its output length is unknown at submit (the
    max_tokens cap is usually far from it), and the least-loaded replica in requests also tends to
    be the one that frees KV cache first. Used on the event loop only.
    """

    def __init__(self, num_replicas: int):
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
        self.outstanding = [0] * num_replicas  # by replica
        self._next = 0  # where the search for the least loaded starts: after the last pick

    def pick(self) -> int:
        """The replica to submit the next request to (call `started` once it is submitted)."""
        load, n = self.outstanding, len(self.outstanding)
        best = self._next
        for i in range(1, n):
            k = (self._next + i) % n
            if load[k] < load[best]:
                best = k
        self._next = (best + 1) % n
        return best

    def started(self, replica: int) -> None:
        self.outstanding[replica] += 1

    def finished(self, replica: int) -> None:
        """A request of `replica` finished (or was given up with its replica's death)."""
        self.outstanding[replica] -= 1
