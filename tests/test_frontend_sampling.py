"""Request fields → SamplingSpec: defaults, normalization, and what is refused."""

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
    chat_spec,
    completion_prompt,
    generate_spec,
    openai_spec,
)


def chat(**kw):
    return CHAT_DECODER.decode(msgspec.json.encode({"messages": [{"role": "user", "content": "x"}], **kw}))


def test_openai_defaults():
    spec = chat_spec(chat())
    assert (spec.max_tokens, spec.temperature, spec.top_p, spec.top_k, spec.seed) == (None, 1.0, 1.0, -1, -1)
    assert spec.stop == () and not spec.ignore_eos


def test_max_completion_tokens_wins_over_max_tokens():
    assert chat_spec(chat(max_tokens=5, max_completion_tokens=9)).max_tokens == 9


def test_normalization_of_top_k_seed_and_stop():
    spec = chat_spec(chat(top_k=0, seed=-5, stop=["a", "", "a", "b"]))
    assert spec.top_k == -1 and spec.seed == 2**63 - 5 and spec.stop == ("a", "b")
    assert chat_spec(chat(top_k=10**30)).top_k == -1
    assert chat_spec(chat(seed=10**30)).seed < 2**63
    assert chat_spec(chat(stop="end")).stop == ("end",)
    assert chat_spec(chat(temperature=0)).temperature == 0.0


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": -0.01}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"n": 2}, "n"),
        ({"n": 0}, "n"),
    ],
)
def test_out_of_range_values_are_400_naming_the_field(kw, param):
    with pytest.raises(ApiError) as e:
        chat_spec(chat(**kw))
    assert (e.value.status, e.value.param) == (400, param)


def test_generate_do_sample_false_is_greedy_and_stop_sequences_alias():
    req = GENERATE_DECODER.decode(b'{"inputs": "x", "parameters": {"temperature": 0.8, "stop": "!"}}')
    spec = generate_spec(req.parameters)
    assert spec.temperature == 0.0 and spec.stop == ("!",) and spec.max_tokens == 16
    req = GENERATE_DECODER.decode(b'{"inputs": "x"}')
    assert generate_spec(req.parameters).max_tokens == 16


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
    openai_spec(req)  # no sampling fields: all defaults, no error
