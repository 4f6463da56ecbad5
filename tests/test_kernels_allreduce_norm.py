"""The fused all-reduce + residual add + RMSNorm: its reference against the composition of the
existing ones, and its kernel in the interpreter, with one rank or with a second rank simulated
(its buffer half and its signals written beforehand, as the peer would have)."""

import pytest
import torch

from lightllm_async.kernels import rms_norm_ref
from lightllm_async.kernels.allreduce_norm import Peers, allreduce_add_rms_norm, allreduce_add_rms_norm_ref
from lightllm_async.kernels.testing import TOLERANCE, rel_err
from lightllm_async.layers.parallel import SINGLE, TPGroup

MAX_ROWS, ROW_STRIDE, SIG_BASE = 40, 200, 3  # irregular on purpose


class SimulatedRanks:
    """Every rank's buffer, signal pad and parity as CPU tensors; `peers(rank)` is one rank's
    view. The interpreter runs one rank's kernel at a time, so a peer's part of the protocol
    (its partial row in its buffer, its signal in this rank's pad) is written by `stage`."""

    def __init__(self, world: int, dtype):
        self.world = world
        self.buffers = [torch.zeros(2, MAX_ROWS, ROW_STRIDE, dtype=dtype) for _ in range(world)]
        self.pads = [torch.zeros(SIG_BASE + MAX_ROWS * world, dtype=torch.int32) for _ in range(world)]
        self.parities = [torch.zeros(MAX_ROWS, dtype=torch.int32) for _ in range(world)]
        self.buf_ptrs = torch.tensor([b.data_ptr() for b in self.buffers], dtype=torch.int64)
        self.pad_ptrs = torch.tensor([p.data_ptr() for p in self.pads], dtype=torch.int64)

    def peers(self, rank: int) -> Peers:
        return Peers(
            self.buf_ptrs,
            self.pad_ptrs,
            self.parities[rank],
            rank,
            self.world,
            MAX_ROWS,
            ROW_STRIDE,
            SIG_BASE,
        )

    def stage(self, rank: int, partials: list[torch.Tensor]) -> None:
        """What the other ranks would have done before `rank` waits: published their rows in the
        half `rank` will read, and signalled it; and `rank`'s own earlier signals consumed."""
        m, n = partials[0].shape
        for peer in range(self.world):
            if peer == rank:
                continue
            half = self.parities[rank][:m].long()  # every rank's parity is the same
            self.buffers[peer][half, torch.arange(m), :n] = partials[peer]
            flags = self.pads[rank][SIG_BASE:].view(MAX_ROWS, self.world)
            flags[:m, peer] = 1
            self.pads[peer].zero_()


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
        assert not ranks.pads[0].any(), "every signal sent was taken"
    assert torch.equal(ranks.parities[0][:rows], torch.ones(rows, dtype=torch.int32))  # 3 flips
    assert not ranks.parities[0][rows:].any(), "rows beyond the call's keep their parity"


@pytest.mark.parametrize("rows, hidden", [(1, 64), (5, 100), (17, 197)])
def test_two_simulated_ranks_agree_bitwise_with_each_other_and_the_reference(interpreter, rows, hidden):
    dtype = torch.bfloat16
    ranks = SimulatedRanks(2, dtype)
    for call in range(3):  # rows sizes change between calls: the parity is per row slot
        m = rows + call
        partials = [torch.randn(m, hidden, dtype=dtype) * (r + 1) for r in range(2)]
        residual, weight = torch.randn(m, hidden, dtype=dtype), torch.randn(hidden, dtype=dtype)
        results = []
        for rank in range(2):
            parity_before = ranks.parities[rank].clone()
            ranks.stage(rank, partials)
            results.append(allreduce_add_rms_norm(partials[rank], residual, weight, 1e-5, ranks.peers(rank)))
            half = parity_before[:m].long()
            assert torch.equal(ranks.buffers[rank][half, torch.arange(m), :hidden], partials[rank])
            assert torch.equal(ranks.parities[rank][:m], 1 - parity_before[:m])
            flags = ranks.pads[1 - rank][SIG_BASE:].view(MAX_ROWS, 2)
            assert flags[:m, rank].eq(1).all() and flags[m:].eq(0).all(), "signalled its peer, row by row"
            assert not ranks.pads[rank].any(), "took every signal sent to it"
        (out0, res0), (out1, res1) = results
        assert torch.equal(out0, out1) and torch.equal(res0, res1), "the ranks compute the same bits"
        check_against_reference(
            out0, res0, *allreduce_add_rms_norm_ref(partials, residual, weight, 1e-5), dtype
        )


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
