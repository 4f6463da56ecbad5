"""The official `openai` client against a real server on a tiny random Llama (CPU, fp32): every
sampling parameter of issue 11, chat and completions, streaming and not, and log-probabilities
equal to HF transformers' log-softmax on the same weights."""

from __future__ import annotations

import math

import pytest
import torch

from engine_harness import hf_greedy
from serverproc import ServerProcess

openai = pytest.importorskip("openai")
TOL = 2e-4


@pytest.fixture(scope="module")
def server(tiny_llama_path):
    srv = ServerProcess(
        "--model", tiny_llama_path, "--device", "cpu", "--dtype", "float32", "--max-model-len", "512",
        "--kv-cache-tokens", "16384", "--max-running-requests", "16", "--num-slots", "40",
    )  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def tok(tiny_llama_path):
    from lightllm_async.tokenizer import load_tokenizer

    return load_tokenizer(tiny_llama_path)


@pytest.fixture(scope="module")
def hf(tiny_llama_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


MESSAGES = [{"role": "user", "content": "def value(x): return"}]


def chat_prompt(tok) -> list[int]:
    return tok.encode(tok.apply_chat_template(MESSAGES), add_special_tokens=False)


def test_completions_logprobs_equal_hf_log_softmax(client, tok, hf):
    prompt = [5, 77, 300, 41, 9, 120]
    out = client.completions.create(
        model="m", prompt=prompt, max_tokens=10, temperature=0, logprobs=5, extra_body={"ignore_eos": True}
    )
    expected = hf_greedy(hf, prompt, 10)
    lp = out.choices[0].logprobs
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in expected]
    ref = hf_logprobs(hf, prompt + expected)
    offset = 0
    for i, t in enumerate(expected):
        row = ref[len(prompt) + i - 1]
        assert abs(lp.token_logprobs[i] - row[t].item()) < TOL
        top = lp.top_logprobs[i]
        assert len(top) <= 6 and math.isclose(max(top.values()), row.max().item(), abs_tol=TOL)
        want = row.topk(5).values.tolist() + [row[t].item()]
        assert all(min(abs(v - w) for w in want) < TOL for v in top.values())
        assert lp.text_offset[i] == offset
        offset += len(lp.tokens[i])
    assert out.choices[0].text == tok.decode(expected)


def test_chat_logprobs_streamed_and_not_equal_hf_log_softmax(client, tok, hf):
    prompt = chat_prompt(tok)
    expected = hf_greedy(hf, prompt, 12)
    kw = dict(model="m", messages=MESSAGES, max_tokens=12, temperature=0, logprobs=True, top_logprobs=4)
    whole = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    entries = whole.choices[0].logprobs.content
    streamed = [
        e
        for c in client.chat.completions.create(**kw, stream=True, extra_body={"ignore_eos": True})
        for ch in c.choices
        if ch.logprobs is not None
        for e in ch.logprobs.content
    ]
    ref = hf_logprobs(hf, prompt + expected)
    for got in (entries, streamed):
        assert [e.token for e in got] == [tok.decode([t], skip_special_tokens=False) for t in expected]
        for i, (e, t) in enumerate(zip(got, expected, strict=True)):
            row = ref[len(prompt) + i - 1]
            assert abs(e.logprob - row[t].item()) < TOL and e.bytes == list(e.token.encode())
            assert len(e.top_logprobs) == 4
            assert [x.logprob for x in e.top_logprobs] == pytest.approx(row.topk(4).values.tolist(), abs=TOL)


def test_penalties_and_friends_are_accepted_and_act(client, tok):
    favoured = tok.encode(" return", add_special_tokens=False)[0]
    base = dict(model="m", messages=MESSAGES, max_tokens=6, temperature=0)
    forced = client.chat.completions.create(**base, logit_bias={str(favoured): 100})
    assert forced.choices[0].message.content == tok.decode([favoured] * 6)
    # a strong repetition penalty forbids the forced token a second time: the bias alone keeps it
    rep = client.chat.completions.create(
        **base, logit_bias={str(favoured): 5}, extra_body={"repetition_penalty": 100.0}
    )
    assert rep.choices[0].message.content.count(tok.decode([favoured])) <= 1
    extra = {
        "top_k": 20, "min_p": 0.05, "presence_penalty": 0.5, "frequency_penalty": 0.5,
        "repetition_penalty": 1.2, "min_tokens": 8, "stop_token_ids": [favoured],
    }  # fmt: skip
    every = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=8, temperature=0.8, seed=3, top_p=0.9, extra_body=extra
    )
    assert every.usage.completion_tokens == 8 and every.choices[0].finish_reason == "length"
    again = client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0.8,
        seed=3,
        top_p=0.9,
        stream=True,
        extra_body=extra,
    )
    text = "".join(c.choices[0].delta.content or "" for c in again if c.choices)
    assert text == every.choices[0].message.content  # same seed, same tokens, streamed or not


def test_stop_token_ids_end_the_output_and_min_tokens_holds_them_off(client, tok):
    prompt = [5, 77, 300, 41]
    free = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                                     extra_body={"ignore_eos": True})  # fmt: skip
    tokens = free.choices[0].logprobs.tokens
    stop_at = tok.encode(tokens[2], add_special_tokens=False)
    assert len(stop_at) == 1 and tokens.index(tokens[2]) == 2
    stopped = client.completions.create(
        model="m", prompt=prompt, max_tokens=12, temperature=0,
        extra_body={"stop_token_ids": stop_at, "ignore_eos": True},
    )  # fmt: skip
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 3
    assert stopped.choices[0].text == "".join(tokens[:2])  # the stop token is not shown
    held = client.completions.create(
        model="m", prompt=prompt, max_tokens=12, temperature=0, stream=True,
        extra_body={"stop_token_ids": stop_at, "ignore_eos": True, "min_tokens": 5},
    )  # fmt: skip
    chunks = [c for c in held if c.choices]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len("".join(c.choices[0].text for c in chunks)) >= len("".join(tokens[:5]))


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"600": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"extra_body": {"min_tokens": 9}}, "min_tokens"),  # more than max_tokens (4)
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ],
)
def test_out_of_range_parameters_are_openai_400s(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4, **kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_completions_logprobs_above_five_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="x", max_tokens=2, logprobs=6)
    assert e.value.body["param"] == "logprobs"


def _streamed_texts(stream) -> tuple[dict[int, str], dict[int, str | None], list]:
    texts, finish, usage = {}, {}, []
    for c in stream:
        if c.usage is not None:
            usage.append(c.usage)
        for ch in c.choices:
            piece = ch.delta.content if hasattr(ch, "delta") else ch.text
            texts[ch.index] = texts.get(ch.index, "") + (piece or "")
            if ch.finish_reason is not None:
                finish[ch.index] = ch.finish_reason
    return texts, finish, usage


def test_n_choices_in_chat_streamed_and_not(client):
    kw = dict(model="m", messages=MESSAGES, max_tokens=7, extra_body={"ignore_eos": True})
    greedy = client.chat.completions.create(**kw, n=3, temperature=0)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1 and greedy.usage.completion_tokens == 21
    sampled = client.chat.completions.create(**kw, n=4, temperature=1.5, seed=11)
    texts = [c.message.content for c in sampled.choices]
    assert len(set(texts)) > 1  # each choice draws its own tokens ...
    stream = client.chat.completions.create(
        **kw, n=4, temperature=1.5, seed=11, stream=True, stream_options={"include_usage": True}
    )
    got, finish, usage = _streamed_texts(stream)
    assert [got[i] for i in range(4)] == texts  # ... and the request reproduces, streamed too
    assert finish == {i: "length" for i in range(4)} and usage[0].completion_tokens == 28


def test_n_choices_in_completions_with_logprobs_streamed(client):
    kw = dict(model="m", prompt="def value", max_tokens=5, temperature=1.0, seed=2, logprobs=1)
    whole = client.completions.create(**kw, n=2, extra_body={"ignore_eos": True})
    stream = client.completions.create(**kw, n=2, stream=True, extra_body={"ignore_eos": True})
    offsets, tokens, texts = {0: [], 1: []}, {0: [], 1: []}, {0: "", 1: ""}
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.text
            if ch.logprobs is not None:
                offsets[ch.index] += ch.logprobs.text_offset
                tokens[ch.index] += ch.logprobs.tokens
    for ch in whole.choices:
        i = ch.index
        assert texts[i] == ch.text and tokens[i] == ch.logprobs.tokens
        assert offsets[i] == ch.logprobs.text_offset
        assert offsets[i][0] == 0 and len(tokens[i]) == 5


def test_best_of_and_too_many_choices_are_400s(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="x", max_tokens=2, best_of=3)
    assert e.value.body["param"] == "best_of" and "not supported" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, n=41)  # 40 slots
    assert e.value.body["param"] == "n"


def test_echo_returns_the_prompt_and_its_logprobs_equal_hf_log_softmax(client, tok, hf):
    prompt = [5, 77, 300, 41, 9, 120, 260, 33]
    kw = dict(
        model="m", prompt=prompt, max_tokens=4, temperature=0, echo=True, extra_body={"ignore_eos": True}
    )
    whole = client.completions.create(**kw, logprobs=3)
    expected = hf_greedy(hf, prompt, 4)
    seq = prompt + expected
    ref = hf_logprobs(hf, seq)
    choice = whole.choices[0]
    assert choice.text == tok.decode(prompt) + tok.decode(expected)
    lp = choice.logprobs
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in seq]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for q in range(1, len(seq)):
        assert abs(lp.token_logprobs[q] - ref[q - 1, seq[q]].item()) < TOL, q
        assert math.isclose(max(lp.top_logprobs[q].values()), ref[q - 1].max().item(), abs_tol=TOL)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:q]) for q in range(len(seq))]
    # streamed: the prompt comes first, with the same entries; then the completion's
    events = [c for c in client.completions.create(**kw, logprobs=3, stream=True) if c.choices]
    assert events[0].choices[0].text == tok.decode(prompt)
    streamed = [x for c in events if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs and "".join(c.choices[0].text for c in events) == choice.text
    # without logprobs: only the text; with a text prompt: that very text
    plain = client.completions.create(model="m", prompt="def value", max_tokens=3, echo=True)
    assert plain.choices[0].text.startswith("def value") and plain.choices[0].logprobs is None


def test_echo_of_a_long_prompt_streams_through_the_ring_in_chunks(client, hf):
    """A prompt longer than the 256-position logprob ring and the per-step prompt-logprob budget:
    the engine holds back until the reader frees room, nothing is lost."""
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, 512, (460,), generator=g).tolist()
    out = client.completions.create(
        model="m", prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=1, n=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    ref = hf_logprobs(hf, prompt + hf_greedy(hf, prompt, 2))
    for choice in out.choices:
        got = choice.logprobs.token_logprobs
        assert len(got) == 462 and got[0] is None
        want = [ref[q - 1, t].item() for q, t in enumerate(prompt) if q]
        assert max(abs(a - b) for a, b in zip(got[1:460], want, strict=True)) < TOL
