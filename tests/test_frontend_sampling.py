"""Request fields → SamplingParams: defaults, normalization, and what is refused."""

from __future__ import annotations

import msgspec
import pytest

from lightllm_async.frontend.protocol import (
    CHAT_DECODER,
    COMPLETION_DECODER,
    GENERATE_DECODER,
    ApiError,
)
from lightllm_async.frontend.sampling import (
    chat_messages,
    chat_params,
    choice_count,
    choice_params,
    completion_params,
    completion_prompt,
    generate_params,
)
from lightllm_async.types import SamplingParams


def chat(**kw):
    return CHAT_DECODER.decode(msgspec.json.encode({"messages": [{"role": "user", "content": "x"}], **kw}))


def test_openai_defaults():
    spec = chat_params(chat())
    assert (spec.max_new_tokens, spec.temperature, spec.top_p, spec.top_k, spec.seed) == (
        None,
        1.0,
        1.0,
        0,
        None,
    )
    assert spec.stop == () and not spec.ignore_eos


def test_max_completion_tokens_wins_over_max_tokens():
    assert chat_params(chat(max_tokens=5, max_completion_tokens=9)).max_new_tokens == 9


def test_normalization_of_top_k_seed_and_stop():
    spec = chat_params(chat(top_k=0, seed=-5, stop=["a", "", "a", "b"]))
    assert spec.top_k == 0 and spec.seed == 2**64 - 5 and spec.stop == ("a", "b")
    assert chat_params(chat(top_k=-1)).top_k == 0
    assert chat_params(chat(top_k=10**30)).top_k == 0
    assert chat_params(chat(seed=2**64 - 1)).seed == 2**64 - 1
    assert chat_params(chat(seed=-(2**63))).seed == 2**63
    assert chat_params(chat(stop="end")).stop == ("end",)
    assert chat_params(chat(temperature=0)).temperature == 0.0


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": -0.01}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ],
)
def test_out_of_range_values_are_400_naming_the_field(kw, param):
    with pytest.raises(ApiError) as e:
        chat_params(chat(**kw))
    assert (e.value.status, e.value.param) == (400, param)


def test_generate_do_sample_false_is_greedy_and_stop_sequences_alias():
    req = GENERATE_DECODER.decode(b'{"inputs": "x", "parameters": {"temperature": 0.8, "stop": "!"}}')
    spec = generate_params(req.parameters)
    assert spec.temperature == 0.0 and spec.stop == ("!",) and spec.max_new_tokens == 16
    req = GENERATE_DECODER.decode(b'{"inputs": "x"}')
    assert generate_params(req.parameters).max_new_tokens == 16


def test_text_content_parts_are_joined():
    req = chat(
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None},
        ]
    )
    assert chat_messages(req) == [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": ""}]


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("text", "text"),
        (["text"], "text"),
        ([1, 2], [1, 2]),
        ([[3, 4]], [3, 4]),
    ],
)
def test_completion_prompt_shapes(prompt, expected):
    req = COMPLETION_DECODER.decode(msgspec.json.encode({"prompt": prompt}))
    assert completion_prompt(req, vocab_size=100) == expected
    completion_params(req)  # no sampling fields: all defaults, no error


@pytest.mark.parametrize("field", ["temperature", "presence_penalty", "repetition_penalty"])
def test_non_finite_values_are_refused_by_the_record(field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: float("nan")})


def test_denormal_temperature_is_greedy_not_nan():
    """A temperature in the denormal range would overflow logits / T: it means greedy."""
    assert chat_params(chat(temperature=5e-324)).temperature == 0.0
    assert chat_params(chat(temperature=1e-6)).greedy
    assert chat_params(chat(temperature=1e-4)).temperature == 1e-4


def test_generate_errors_name_the_nested_field():
    req = GENERATE_DECODER.decode(b'{"inputs": "x", "parameters": {"top_p": 2.0}}')
    with pytest.raises(ApiError) as e:
        generate_params(req.parameters)
    assert (e.value.status, e.value.param) == (400, "parameters.top_p")
    assert e.value.message.startswith("parameters.top_p ")


def test_context_limit_resolves_or_refuses_in_vllm_words():
    p = SamplingParams()
    assert p.with_context(10, 100).max_new_tokens == 90
    assert SamplingParams(max_new_tokens=5).with_context(10, 100).max_new_tokens == 5
    with pytest.raises(ValueError, match="maximum context length is 100 tokens. However, you requested 101"):
        SamplingParams(max_new_tokens=91).with_context(10, 100)
    with pytest.raises(ValueError, match="your request has 100 input tokens"):
        p.with_context(100, 100)
    with pytest.raises(ValueError, match="empty"):
        p.with_context(0, 100)


def test_penalties_min_tokens_stop_token_ids_and_logit_bias_reach_the_record():
    spec = chat_params(
        chat(
            min_p=0.1, presence_penalty=0.5, frequency_penalty=-0.25, repetition_penalty=1.2,
            min_tokens=3, stop_token_ids=[7, 9, 7], logit_bias={"5": 10, "42": -100.0},
        ),
        vocab_size=100,
    )  # fmt: skip
    assert (spec.min_p, spec.presence_penalty, spec.frequency_penalty, spec.repetition_penalty) == (
        0.1, 0.5, -0.25, 1.2,
    )  # fmt: skip
    assert spec.min_tokens == 3 and spec.stop_ids == (7, 9)
    assert spec.logit_bias == ((5, 10.0), (42, -100.0))
    native = GENERATE_DECODER.decode(
        b'{"inputs": "x", "parameters": {"min_new_tokens": 2, "repetition_penalty": 1.5,'
        b' "presence_penalty": 1, "frequency_penalty": 0.5}}'
    )
    p = generate_params(native.parameters)
    assert (p.min_tokens, p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (2, 1.5, 1, 0.5)


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logit_bias": {"3": 100.5}}, "logit_bias"),
        ({"logit_bias": {"1000": 1}}, "logit_bias"),  # past the vocabulary
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"stop_token_ids": list(range(17))}, "stop_token_ids"),
        ({"stop_token_ids": [2**31]}, "stop_token_ids"),
    ],
)
def test_new_fields_out_of_range_are_400_naming_the_field(kw, param):
    with pytest.raises(ApiError) as e:
        chat_params(chat(**kw), vocab_size=1000)
    assert (e.value.status, e.value.param) == (400, param)


def test_a_logit_bias_key_that_is_not_a_token_id_is_a_decode_error():
    with pytest.raises(msgspec.ValidationError):
        chat(logit_bias={"abc": 1})


def test_n_is_bounded_best_of_refused_and_seeds_spread_over_the_choices():
    assert choice_count(chat(), 8) == 1 and choice_count(chat(n=8, best_of=1), 8) == 8
    for kw, param in (
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),
        ({"best_of": 2}, "best_of"),
        ({"best_of": 0}, "best_of"),
    ):
        with pytest.raises(ApiError) as e:
            choice_count(chat(**kw), 8)
        assert (e.value.status, e.value.param) == (400, param)
    seeded = choice_params(SamplingParams(seed=2**64 - 2), 3)
    assert [p.seed for p in seeded] == [2**64 - 2, 2**64 - 1, 0]
    assert choice_params(SamplingParams(), 3) == [SamplingParams()] * 3
