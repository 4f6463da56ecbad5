"""The sampler on the CPU: filters keep exactly what they promise, draws follow the softmax, seeds
reproduce whatever the batch around them, and nothing produces NaN.

Draws are many rows of one small vocabulary in a single call, so thousands of samples cost one
step. The engine generator is seeded per test, so the statistical tests are deterministic.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from scipy.stats import chi2

from lightllm_async.runner.sampler import SamplingMetadata, _filtered, mix64, sample, seeded_uniform
from lightllm_async.types import SamplingParams

DRAWS = 20000


def draw(logits_row: torch.Tensor, params: SamplingParams, n: int = DRAWS, positions=None) -> torch.Tensor:
    """n samples of one distribution: n copies of the row in one batch (positions 0..n-1 if seeded)."""
    logits = logits_row.float().expand(n, -1).contiguous()
    positions = list(range(n)) if positions is None else positions
    return sample(logits, SamplingMetadata.build([params] * n, positions))


def counts(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab)


def assert_matches(observed: torch.Tensor, probs: torch.Tensor) -> None:
    """Chi-square goodness of fit over the tokens of non-negligible probability, at p = 1e-6."""
    n = observed.sum().item()
    expected = probs.double() * n
    support = expected > 5
    assert observed[~support].sum() <= max(10, 3 * expected[~support].sum().item())
    if support.sum() < 2:
        return  # one possible token: nothing to fit
    stat = ((observed[support].double() - expected[support]) ** 2 / expected[support]).sum().item()
    assert stat < chi2.ppf(1 - 1e-6, int(support.sum()) - 1), (observed, expected)


@pytest.fixture(autouse=True)
def engine_generator():
    torch.manual_seed(1234)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_unseeded_frequencies_match_softmax_at_temperature(temperature):
    logits = torch.randn(11) * 2
    tokens = draw(logits, SamplingParams(temperature=temperature), positions=[0] * DRAWS)
    assert_matches(counts(tokens, 11), torch.softmax(logits / temperature, -1))


@pytest.mark.parametrize("temperature", [0.6, 1.3])
def test_seeded_frequencies_over_positions_match_softmax(temperature):
    # One request's draws at positions 0..DRAWS-1: the hash must look uniform along positions.
    logits = torch.randn(9) * 1.5
    tokens = draw(logits, SamplingParams(temperature=temperature, seed=987654321))
    assert_matches(counts(tokens, 9), torch.softmax(logits / temperature, -1))


def test_seeded_frequencies_over_seeds_match_softmax():
    logits = torch.randn(7)
    params = [SamplingParams(seed=s) for s in range(DRAWS)]
    tokens = sample(logits.expand(DRAWS, -1).contiguous(), SamplingMetadata.build(params, [5] * DRAWS))
    assert_matches(counts(tokens, 7), torch.softmax(logits, -1))


@pytest.mark.parametrize("k", [1, 2, 7, 31])
@pytest.mark.parametrize("seed", [None, 42])
def test_top_k_never_leaves_the_k_most_likely_and_keeps_their_ratios(k, seed):
    vocab = 257
    logits = torch.randn(vocab) * 0.3  # flat: without the filter, the tail would be drawn often
    top = logits.topk(k).indices
    tokens = draw(logits, SamplingParams(top_k=k, seed=seed))
    c = counts(tokens, vocab)
    outside = torch.ones(vocab, dtype=torch.bool)
    outside[top] = False
    assert c[outside].sum() == 0
    probs = torch.zeros(vocab)
    probs[top] = torch.softmax(logits[top], -1)
    assert_matches(c, probs)


@pytest.mark.parametrize("seed", [None, 7])
def test_top_p_keeps_exactly_the_nucleus(seed):
    # Sorted probabilities 0.4, 0.25, 0.15, 0.1, 0.06, 0.04: the mass before each is 0, .4, .65,
    # .8, .9, .96. With top_p 0.7 the nucleus is the first three (their mass .8 is the first >= .7).
    probs = torch.tensor([0.06, 0.25, 0.04, 0.4, 0.1, 0.15])
    nucleus = torch.tensor([False, True, False, True, False, True])
    tokens = draw(probs.log(), SamplingParams(top_p=0.7, seed=seed))
    c = counts(tokens, 6)
    assert c[~nucleus].sum() == 0
    assert (c[nucleus] > 0).all()
    assert_matches(c, torch.where(nucleus, probs, 0.0) / probs[nucleus].sum())


def test_top_p_applies_to_what_top_k_kept():
    # top_k 3 keeps .4 .25 .15 (renormalised .5 .3125 .1875); top_p .75 of that keeps the first two.
    probs = torch.tensor([0.06, 0.25, 0.04, 0.4, 0.1, 0.15])
    c = counts(draw(probs.log(), SamplingParams(top_k=3, top_p=0.75)), 6)
    assert c[[0, 2, 4, 5]].sum() == 0 and (c[[1, 3]] > 0).all()


def test_min_p_drops_tokens_below_its_share_of_the_most_likely():
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])  # min_p .2: floor .1, so token 3 goes
    c = counts(draw(probs.log(), SamplingParams(min_p=0.2)), 4)
    assert c[3] == 0 and (c[:3] > 0).all()


def test_top_p_one_keeps_tokens_whose_mass_is_lost_to_rounding():
    # A long tail of tiny probabilities: float32's cumulative sum stops growing long before the
    # end, so "mass before the token < 1.0 x total" drops hundreds of tokens that top_p 1 (off)
    # must keep. The row beside it only switches the filtering path on.
    probs = torch.softmax(torch.randn(2, 50000) * 3, -1)
    ordered = probs[0].sort(descending=True).values
    mass = ordered.cumsum(0)
    assert (mass - ordered >= mass[-1]).sum() > 100  # the naive test would drop these
    meta = SamplingMetadata.build([SamplingParams(top_p=1.0), SamplingParams(top_k=5)], [0, 0])
    filtered = _filtered(probs, meta)
    assert torch.equal(filtered[0], probs[0])
    assert (filtered[1] > 0).sum() == 5


def test_greedy_rows_are_argmax_in_a_mixed_batch():
    logits = torch.randn(13, 4099)
    params = [
        SamplingParams(temperature=0.0) if i % 3 == 0 else SamplingParams(top_k=1, seed=i)
        if i % 3 == 1 else SamplingParams(temperature=1.0, seed=i if i % 2 else None)
        for i in range(13)
    ]  # fmt: skip
    tokens = sample(logits, SamplingMetadata.build(params, range(13)))
    greedy = [i for i in range(13) if i % 3 != 2]
    assert tokens[greedy].tolist() == logits.argmax(-1)[greedy].tolist()


def test_tiny_positive_temperature_is_greedy_and_never_nan():
    # SamplingParams turns these into 0; the sampler must hold on its own when handed them raw.
    logits = torch.randn(6, 257) * 30
    logits[:, 5] = float("-inf")
    params = []
    for t in (1e-30, 1e-40, 1e-6, 1e-45, 3e-38, 1e-12):
        p = SamplingParams(seed=3)
        object.__setattr__(p, "temperature", t)
        params.append(p)
    tokens = sample(logits, SamplingMetadata.build(params, [0] * 6))
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_no_nan_or_out_of_range_token_with_heavy_filtering():
    logits = torch.randn(64, 1000) * 20
    logits[:, :500] = float("-inf")  # many exact zeros in the probabilities
    params = [
        SamplingParams(temperature=1e-4 if i % 2 else 2.0, top_k=i % 5, top_p=0.01 + i / 70)
        for i in range(64)
    ]
    for _ in range(20):
        tokens = sample(logits, SamplingMetadata.build(params, [0] * 64))
        assert ((tokens >= 500) & (tokens < 1000)).all()


def _seeded_sequence(seed: int, logits: torch.Tensor, others: list[SamplingParams], row: int) -> list[int]:
    """One request's tokens at positions 0..L-1, placed at `row` among `others` in every step."""
    out = []
    for n in range(logits.shape[0]):
        params = others[:row] + [SamplingParams(temperature=0.9, top_k=40, seed=seed)] + others[row:]
        batch = torch.randn(len(params), logits.shape[1]) * 3
        batch[row] = logits[n]
        tokens = sample(batch, SamplingMetadata.build(params, [n] * len(params)))
        out.append(tokens[row].item())
    return out


def test_same_seed_same_tokens_whatever_the_batch_and_row():
    logits = torch.randn(24, 151) * 0.5  # flat rows: a different noise would change the tokens
    alone = _seeded_sequence(99, logits, [], 0)
    crowd = [SamplingParams(seed=s) for s in range(5)] + [SamplingParams(), SamplingParams(temperature=0)]
    assert _seeded_sequence(99, logits, crowd, 3) == alone
    assert _seeded_sequence(99, logits, crowd[::-1], 7) == alone
    assert _seeded_sequence(99, logits, [SamplingParams(top_p=0.3)] * 30, 30) == alone
    assert _seeded_sequence(100, logits, [], 0) != alone


@pytest.mark.parametrize("seed", [0, 1, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1])
def test_seeds_over_the_whole_64_bit_range_reproduce_and_differ(seed):
    logits = torch.zeros(40, 97)  # uniform: the sequence is the noise alone
    sequence = _seeded_sequence(seed, logits, [], 0)
    assert _seeded_sequence(seed, logits, [SamplingParams()] * 3, 1) == sequence
    neighbours = {seed ^ 1, (seed + 1) % 2**64, (seed - 1) % 2**64, seed ^ 2**63}
    for other in neighbours:
        assert _seeded_sequence(other, logits, [], 0) != sequence


def test_seeded_noise_is_a_function_of_seed_position_and_token_only():
    seed = torch.tensor([5, 5, -3, 5], dtype=torch.int64)
    position = torch.tensor([0, 1, 0, 0], dtype=torch.int64)
    u = seeded_uniform(seed, position, 4099)
    assert torch.equal(u[0], u[3]) and not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert torch.equal(seeded_uniform(seed[:1], position[:1], 17)[0], u[0, :17])  # prefix of the vocab
    assert (u > 0).all() and (u < 1).all()


def test_mix64_is_splitmix64():
    def reference(x: int) -> int:
        m = 2**64 - 1
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & m
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & m
        return x ^ (x >> 31)

    values = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0x123456789ABCDEF0, 987654321]
    signed = torch.tensor([v - 2**64 if v >= 2**63 else v for v in values], dtype=torch.int64)
    assert [v % 2**64 for v in mix64(signed).tolist()] == [reference(v) for v in values]


def test_metadata_flags_pick_paths_without_a_device_read():
    greedy = SamplingMetadata.build([SamplingParams(temperature=0), SamplingParams(top_k=1)], [0, 0])
    assert greedy.all_greedy and not greedy.any_filter
    mixed = SamplingMetadata.build([SamplingParams(seed=2**64 - 1), SamplingParams(top_p=0.5)], [3, 4])
    assert not mixed.all_greedy and mixed.any_filter and not mixed.all_seeded
    assert (
        mixed.seeded_rows.tolist() == [0] and mixed.seed.tolist() == [-1] and mixed.position.tolist() == [3]
    )
    seeded = SamplingMetadata.build(
        [dataclasses.replace(SamplingParams(), seed=1), SamplingParams(temperature=0)], [0, 0]
    )
    assert seeded.all_seeded and seeded.greedy.tolist() == [False, True]
