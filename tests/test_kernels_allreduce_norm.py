"""The fused all-reduce + residual add + RMSNorm: its reference against the composition of the
existing ones, and its kernel in the interpreter, with one rank or with a second rank simulated
(its rows pushed into this rank's buffer beforehand, as the peer would have)."""

import pytest
import torch

from lightllm_async.kernels import rms_norm_ref
from lightllm_async.kernels.allreduce_norm import (
    Peers,
    allreduce_add_rms_norm,
    allreduce_add_rms_norm_ref,
    allreduce_rows,
    empty_bits,
    int_view,
)
from lightllm_async.kernels.testing import TOLERANCE, rel_err
from lightllm_async.layers.parallel import SINGLE, TPGroup

MAX_ROWS, ROW_STRIDE = 40, 200  # irregular on purpose


def bits(x: torch.Tensor) -> torch.Tensor:
    """x as sent: its integer view, -0.0 sent as +0.0."""
    b = x.view(int_view(x.dtype)).clone()
    b[b == empty_bits(x.dtype)] = 0
    return b


class SimulatedRanks:
    """Every rank's buffer and row counts as CPU tensors; `peers(rank)` is one rank's view. The
    interpreter runs one rank's kernel at a time, so a peer's part of the protocol (its rows
    pushed into this rank's buffer) is written by `stage`."""

    def __init__(self, world: int, dtype):
        self.world, self.dtype = world, dtype
        self.buffers = [
            torch.full((2, world, MAX_ROWS, ROW_STRIDE), empty_bits(dtype), dtype=int_view(dtype))
            for _ in range(world)
        ]
        self.counts = [torch.zeros(MAX_ROWS, dtype=torch.int32) for _ in range(world)]
        self.buf_ptrs = torch.tensor([b.data_ptr() for b in self.buffers], dtype=torch.int64)

    def peers(self, rank: int) -> Peers:
        return Peers(self.buf_ptrs, self.counts[rank], rank, self.world, MAX_ROWS, ROW_STRIDE)

    def stage(self, rank: int, partials: list[torch.Tensor]) -> None:
        """What the other ranks would have done before `rank` waits: pushed their rows into the
        half of `rank`'s buffer that `rank` reads now."""
        m, n = partials[0].shape
        half = (self.counts[rank][:m] & 1).long()  # every rank's counts are the same
        for peer in range(self.world):
            if peer != rank:
                self.buffers[rank][half, peer, torch.arange(m), :n] = bits(partials[peer])

    def all_empty(self, rank: int) -> bool:
        return bool(self.buffers[rank].eq(empty_bits(self.dtype)).all())


def test_reference_is_the_all_reduce_then_rms_norm_ref():
    partials = [torch.randn(7, 99, dtype=torch.bfloat16) for _ in range(3)]
    residual, weight = torch.randn(7, 99, dtype=torch.bfloat16), torch.randn(99, dtype=torch.bfloat16)
    reduced = (partials[0].float() + partials[1].float() + partials[2].float()).bfloat16()
    out, res = allreduce_add_rms_norm_ref(partials, residual, weight, 1e-5)
    ref_out, ref_res = rms_norm_ref(reduced, weight, 1e-5, residual)
    assert torch.equal(out, ref_out) and torch.equal(res, ref_res)
    out, res = allreduce_add_rms_norm_ref(partials, None, weight, 1e-5)
    assert torch.equal(res, reduced) and torch.equal(out, rms_norm_ref(reduced, weight, 1e-5))


def check_against_reference(out, res, ref_out, ref_res, dtype):
    if dtype == torch.float32:  # the interpreter rounds to bfloat16 its own way, not to nearest even
        assert torch.equal(res, ref_res), "the residual is a sum and an add: exact"
    assert rel_err(res, ref_res) < TOLERANCE[dtype]
    assert not out.isnan().any() and rel_err(out, ref_out) < TOLERANCE[dtype]


@pytest.mark.parametrize("rows, hidden", [(1, 64), (7, 100), (33, 197)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_rank_kernel_matches_reference_in_interpreter(interpreter, rows, hidden, with_residual, dtype):
    ranks = SimulatedRanks(1, dtype)
    for _ in range(3):  # both halves, and back
        x = torch.randn(rows, hidden, dtype=dtype)
        residual = torch.randn(rows, hidden, dtype=dtype) if with_residual else None
        weight = torch.randn(hidden, dtype=dtype)
        out, res = allreduce_add_rms_norm(x, residual, weight, 1e-5, ranks.peers(0))
        check_against_reference(out, res, *allreduce_add_rms_norm_ref([x], residual, weight, 1e-5), dtype)
        assert ranks.all_empty(0), "one rank pushes to no one"
    assert torch.equal(ranks.counts[0][:rows], torch.full((rows,), 3, dtype=torch.int32))
    assert not ranks.counts[0][rows:].any(), "rows beyond the call's keep their count"


@pytest.mark.parametrize("rows, hidden", [(1, 64), (5, 100), (17, 197)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_simulated_ranks_agree_bitwise_with_each_other_and_the_reference(
    interpreter, rows, hidden, dtype
):
    ranks = SimulatedRanks(2, dtype)
    for call in range(3):  # rows sizes change between calls: the halves alternate per row slot
        m = rows + call
        partials = [torch.randn(m, hidden, dtype=dtype) * (r + 1) for r in range(2)]
        partials[1][0, :3] = -0.0  # sent as +0.0: never mistaken for an empty element
        residual, weight = torch.randn(m, hidden, dtype=dtype), torch.randn(hidden, dtype=dtype)
        results = []
        for rank in range(2):
            count_before = ranks.counts[rank].clone()
            ranks.stage(rank, partials)
            results.append(allreduce_add_rms_norm(partials[rank], residual, weight, 1e-5, ranks.peers(rank)))
            half = (count_before[:m] & 1).long()
            peer = 1 - rank
            pushed = ranks.buffers[peer][half, rank, torch.arange(m), :hidden]
            assert torch.equal(pushed, bits(partials[rank])), "pushed its rows into the peer's buffer"
            ranks.buffers[peer][half, rank, torch.arange(m), :hidden] = empty_bits(
                dtype
            )  # the peer reads them
            assert torch.equal(ranks.counts[rank][:m], count_before[:m] + 1)
            assert ranks.all_empty(rank), "emptied every slot it read"
        (out0, res0), (out1, res1) = results
        assert torch.equal(out0, out1) and torch.equal(res0, res1), "the ranks compute the same bits"
        check_against_reference(
            out0, res0, *allreduce_add_rms_norm_ref(partials, residual, weight, 1e-5), dtype
        )


def test_two_simulated_ranks_sum_without_norm(interpreter):
    dtype = torch.bfloat16
    ranks = SimulatedRanks(2, dtype)
    partials = [torch.randn(3, 70, dtype=dtype) for _ in range(2)]
    sums = []
    for rank in range(2):
        ranks.stage(rank, partials)
        sums.append(allreduce_rows(partials[rank], ranks.peers(rank)))
    assert torch.equal(sums[0], sums[1])
    want = allreduce_add_rms_norm_ref(partials, None, torch.ones(70, dtype=dtype), 1e-5)[1]
    assert rel_err(sums[0], want) < TOLERANCE[dtype]  # the interpreter's own bfloat16 rounding
    assert ranks.all_empty(1) and not ranks.all_empty(0)  # rank 1 ran last: its row waits in rank 0's buffer


class DoublingAllReduce:
    """A stand-in for the small all-reduce over two ranks that hold the same tensor: 2x."""

    def fits(self, x):
        return True

    def __call__(self, x):
        return x * 2


class DoublingFused:
    """A stand-in for the fused kernel over two ranks that hold the same x, for up to 4 rows."""

    def __init__(self):
        self.rows = []

    def fits(self, x, residual=None):
        return x.shape[0] <= 4

    def __call__(self, x, residual, weight, eps):
        self.rows.append(x.shape[0])
        return allreduce_add_rms_norm_ref([x, x], residual, weight, eps)

    def sum(self, x):
        self.rows.append(-x.shape[0])  # negative: a sum alone
        return x * 2


def test_all_reduce_norm_with_one_rank_is_rms_norm():
    x, residual, weight = torch.randn(5, 33), torch.randn(5, 33), torch.randn(33)
    out, res = SINGLE.all_reduce_norm(x, residual, weight, 1e-5)
    ref_out, ref_res = rms_norm_ref(x, weight, 1e-5, residual)
    assert torch.equal(out, ref_out) and torch.equal(res, ref_res)


@pytest.mark.parametrize("with_residual", [False, True])
def test_all_reduce_norm_without_the_fused_kernel_reduces_then_normalizes(with_residual):
    x, weight = torch.randn(5, 33), torch.randn(33)
    residual = torch.randn(5, 33) if with_residual else None
    tp = TPGroup(rank=0, size=2, small=DoublingAllReduce())
    out, res = tp.all_reduce_norm(x, residual, weight, 1e-5)
    ref_out, ref_res = allreduce_add_rms_norm_ref([x, x], residual, weight, 1e-5)
    assert torch.equal(res, ref_res) and torch.equal(out, ref_out)


def test_all_reduce_norm_takes_the_fused_kernel_only_where_it_fits():
    x, residual, weight = torch.randn(5, 33), torch.randn(5, 33), torch.randn(33)
    fused = DoublingFused()
    tp = TPGroup(rank=0, size=2, small=DoublingAllReduce(), fused=fused)
    for rows in (4, 5):  # 5 rows do not fit: the all-reduce, then the norm
        out, res = tp.all_reduce_norm(x[:rows], residual[:rows], weight, 1e-5)
        ref_out, ref_res = allreduce_add_rms_norm_ref([x[:rows]] * 2, residual[:rows], weight, 1e-5)
        assert torch.equal(res, ref_res) and torch.equal(out, ref_out)
    assert fused.rows == [4]


def test_all_reduce_takes_the_push_kernel_for_few_rows_and_the_one_shot_beyond():
    class Counting(DoublingAllReduce):
        calls = 0

        def __call__(self, x):
            Counting.calls += 1
            return x * 2

    x = torch.randn(5, 33)
    fused = DoublingFused()
    tp = TPGroup(rank=0, size=2, small=Counting(), fused=fused)
    for rows in (4, 5):
        assert torch.equal(tp.all_reduce(x[:rows]), x[:rows] * 2)
    assert fused.rows == [-4] and Counting.calls == 1, "4 rows by the push kernel, 5 by the one-shot"
