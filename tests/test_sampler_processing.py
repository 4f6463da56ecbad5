"""Properties of the sampler's parameters on a toy vocabulary, drawn by hypothesis: top-k 1 and a
tiny top-p are greedy; min-p keeps exactly the tokens at or above its floor; each penalty moves
each logit in its documented direction by its documented amount (against a plain-Python
reference of vLLM's definitions); min_tokens keeps the stop ids out; logit_bias adds its bias.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightllm_async.runner.sampler import SamplingMetadata, _filtered, processed_logits, sample
from lightllm_async.types import SamplingParams

VOCAB = st.integers(2, 23)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def logits_rows(draw, max_rows: int = 6):
    """[S, V] float32 logits with distinct values per row (so that argmax is unique)."""
    s, v = draw(st.integers(1, max_rows)), draw(VOCAB)
    values = draw(
        st.lists(
            st.lists(
                st.floats(-30, 30, allow_nan=False, width=32), min_size=v, max_size=v, unique=True
            ).filter(lambda r: len({round(x, 3) for x in r}) == len(r)),
            min_size=s,
            max_size=s,
        )
    )
    return torch.tensor(values, dtype=torch.float32)


@st.composite
def histories(draw, s: int, v: int):
    """Per row: (prompt ids, output ids) over a vocabulary of v."""
    ids = st.integers(0, v - 1)
    return [
        (draw(st.lists(ids, min_size=1, max_size=12)), draw(st.lists(ids, max_size=12))) for _ in range(s)
    ]


def meta_for(params, hist=None, vocab=None) -> SamplingMetadata:
    """Metadata as the runner builds it: each row's context lives in a token table."""
    if hist is None:
        return SamplingMetadata.build(params, [0] * len(params), vocab=vocab)
    width = max(len(p) + len(o) for p, o in hist)
    table = torch.zeros(len(hist), width, dtype=torch.int32)
    for r, (p, o) in enumerate(hist):
        table[r, : len(p) + len(o)] = torch.tensor(p + o, dtype=torch.int32)
    contexts = [(r, len(p), len(p) + len(o)) for r, (p, o) in enumerate(hist)]
    meta = SamplingMetadata.build(params, [len(o) for _, o in hist], contexts=contexts, vocab=vocab)
    return meta.with_history(table)


def vllm_penalties(row: list[float], prompt: list[int], output: list[int], p: SamplingParams) -> list[float]:
    """vLLM's apply_penalties for one row, element by element."""
    out = []
    for token, logit in enumerate(row):
        if token in prompt or token in output:
            r = p.repetition_penalty
            logit = logit / r if logit > 0 else logit * r
        count = output.count(token)
        logit -= p.frequency_penalty * count
        logit -= p.presence_penalty * (count > 0)
        out.append(logit)
    return out


PENALTY = st.floats(-2, 2, allow_nan=False)
REPETITION = st.floats(0.05, 5, allow_nan=False)


@SETTINGS
@given(logits=logits_rows(), data=st.data())
def test_penalties_equal_vllms_definition_row_by_row(logits, data):
    s, v = logits.shape
    hist = data.draw(histories(s, v))
    params = [
        SamplingParams(
            repetition_penalty=data.draw(REPETITION),
            presence_penalty=data.draw(PENALTY),
            frequency_penalty=data.draw(PENALTY),
            temperature=data.draw(st.sampled_from([0.0, 0.7, 1.0])),
        )
        for _ in range(s)
    ]
    got = processed_logits(logits, meta_for(params, hist))
    for r in range(s):
        want = vllm_penalties(logits[r].tolist(), *hist[r], params[r])
        assert torch.allclose(got[r], torch.tensor(want), rtol=1e-5, atol=1e-4), (r, got[r], want)


@SETTINGS
@given(logits=logits_rows(max_rows=1), data=st.data())
def test_each_penalty_moves_only_its_tokens_in_its_direction(logits, data):
    v = logits.shape[1]
    prompt, output = data.draw(histories(1, v))[0]
    amount = data.draw(st.floats(0.01, 2))
    base = logits[0]

    def penalized(**penalty) -> torch.Tensor:
        return processed_logits(logits, meta_for([SamplingParams(**penalty)], [(prompt, output)]))[0]

    rep = penalized(repetition_penalty=1 + amount)
    pres, freq = penalized(presence_penalty=amount), penalized(frequency_penalty=amount)
    for t in range(v):
        seen, count = t in prompt or t in output, output.count(t)
        # repetition > 1 pulls every seen token's logit towards lower values, by 1 + amount
        if seen and base[t] > 0:
            assert math.isclose(rep[t], base[t] / (1 + amount), rel_tol=1e-5)
        elif seen:
            assert math.isclose(rep[t], base[t] * (1 + amount), rel_tol=1e-5, abs_tol=1e-6)
        else:
            assert rep[t] == base[t]
        # presence: once per generated token (the prompt does not count); frequency: per occurrence
        assert math.isclose(pres[t], base[t] - amount * (count > 0), abs_tol=1e-4)
        assert math.isclose(freq[t], base[t] - amount * count, abs_tol=1e-4)


@SETTINGS
@given(logits=logits_rows(), data=st.data())
def test_top_k_one_and_a_tiny_top_p_are_greedy(logits, data):
    s, v = logits.shape
    hist = data.draw(histories(s, v))
    extras = dict(
        repetition_penalty=data.draw(REPETITION),
        frequency_penalty=data.draw(PENALTY),
        logit_bias=((data.draw(st.integers(0, v - 1)), data.draw(st.floats(-100, 100))),),
    )
    greedy = sample(logits, meta_for([SamplingParams(temperature=0.0, **extras)] * s, hist))
    temperature = data.draw(st.floats(0.05, 5))
    for filt in ({"top_k": 1}, {"top_p": 1e-7}):
        for seed in (None, data.draw(st.integers(0, 2**64 - 1))):
            p = SamplingParams(temperature=temperature, seed=seed, **filt, **extras)
            assert torch.equal(sample(logits, meta_for([p] * s, hist)), greedy), filt


@SETTINGS
@given(logits=logits_rows(), min_p=st.floats(0.0, 1.0), temperature=st.floats(0.1, 3))
def test_min_p_keeps_exactly_the_tokens_at_or_above_its_floor(logits, min_p, temperature):
    s, _ = logits.shape
    meta = meta_for([SamplingParams(min_p=min_p, temperature=temperature)] * s)
    probs = torch.softmax(logits / temperature, -1)
    kept = _filtered(probs, meta) > 0
    floor = min_p * probs.max(-1, keepdim=True).values
    # ties at the floor itself are the float comparison's to decide: leave them out
    clear = (probs - floor).abs() > 1e-6 * floor.clamp_min(1e-30)
    assert torch.equal(kept[clear], (probs >= floor)[clear])
    assert kept.any(-1).all()  # the most likely token always stays


@SETTINGS
@given(logits=logits_rows(), data=st.data())
def test_min_tokens_bans_the_stop_ids_until_reached_and_never_samples_them(logits, data):
    s, v = logits.shape
    stops = tuple(data.draw(st.lists(st.integers(0, v - 1), min_size=1, max_size=v - 1, unique=True)))
    min_tokens = data.draw(st.integers(1, 5))
    produced = [data.draw(st.integers(0, 7)) for _ in range(s)]
    logits = logits.clone()
    logits[:, list(stops)] += 1000  # a stop id would win every draw
    params = [SamplingParams(stop_ids=stops, min_tokens=min_tokens, seed=r) for r in range(s)]
    meta = SamplingMetadata.build(params, produced)
    got = processed_logits(logits, meta)
    tokens = sample(logits, meta).tolist()
    for r in range(s):
        banned = produced[r] < min_tokens
        assert (got[r, list(stops)] == float("-inf")).all() == banned
        assert (tokens[r] in stops) != banned
        others = [t for t in range(v) if t not in stops]
        assert torch.equal(got[r, others], logits[r, others])


@SETTINGS
@given(logits=logits_rows(), data=st.data())
def test_logit_bias_adds_its_value_to_its_tokens_only(logits, data):
    s, v = logits.shape
    bias = data.draw(
        st.dictionaries(st.integers(0, v + 5), st.floats(-100, 100, allow_nan=False), max_size=v + 2)
    )
    params = [SamplingParams(logit_bias=tuple(bias.items()))] * s
    got = processed_logits(logits, meta_for(params, vocab=v))  # ids past the vocabulary: ignored
    want = logits.clone()
    for t, b in bias.items():
        if t < v:
            want[:, t] += b
    assert torch.allclose(got, want, atol=1e-4)
    # +100 outweighs any spread of these logits (at most 60): greedy picks the favoured token
    favoured = data.draw(st.integers(0, v - 1))
    pick = SamplingParams(temperature=0.0, logit_bias=((favoured, 100.0),))
    assert sample(logits, meta_for([pick] * s)).tolist() == [favoured] * s


def test_a_penalized_seeded_row_draws_the_same_tokens_in_any_batch():
    torch.manual_seed(0)
    vocab, steps = 61, 20
    rows = torch.randn(steps, vocab)
    special = SamplingParams(
        seed=1234, temperature=0.9, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4,
        logit_bias=((3, 5.0), (7, -100.0)), min_tokens=4, stop_ids=(0, 1), top_k=30,
    )  # fmt: skip
    crowd = [
        SamplingParams(temperature=0.0, repetition_penalty=2.0),
        SamplingParams(seed=5, frequency_penalty=1.0, logit_bias=((3, -50.0),)),
        SamplingParams(min_tokens=9, stop_ids=(3,), presence_penalty=-1.0),
        SamplingParams(top_p=0.3, min_p=0.2),
    ]

    def run(others: list[SamplingParams], at: int) -> list[int]:
        prompt, out = [5, 6, 7, 5], []
        other_hist = [([1, 2, 3], [4, 4]) for _ in others]
        for n in range(steps):
            params = others[:at] + [special] + others[at:]
            hist = other_hist[:at] + [(prompt, list(out))] + other_hist[at:]
            batch = torch.randn(len(params), vocab) * 2
            batch[at] = rows[n]
            out.append(sample(batch, meta_for(params, hist)).tolist()[at])
        return out

    alone = run([], 0)
    assert run(crowd, 2) == alone and run(crowd[::-1] * 3, 7) == alone
    assert all(t not in (0, 1) for t in alone[:4]) and 7 not in alone
