"""Incremental detokenization and stop strings, against the real default tokenizer."""

from __future__ import annotations

import random

import pytest

from lightllm_async.frontend.detokenizer import IncrementalDetokenizer, StopMatcher

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Unicode: héllo wörld — naïve café, 日本語のテキスト, emoji 🎉🚀👍🏽 and Ω≈ç√∫.",
    "  leading spaces, trailing spaces  \n\n\ttabs\tand\nnewlines\n",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code with   runs of spaces",
    "😀" * 7 + "🇫🇷🇯🇵" + "\u200d" + "👨‍👩‍👧",
]


@pytest.fixture(scope="module")
def tokenizer():
    tok_mod = pytest.importorskip("lightllm_async.tokenizer")
    loader = pytest.importorskip("lightllm_async.models.loader")
    return tok_mod.load_tokenizer(loader.default_model_path())


def _stream(tokenizer, ids, prompt_ids=(), chunk_sizes=None) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas, i = [], 0
    while i < len(ids):
        n = chunk_sizes.pop(0) if chunk_sizes else 1
        deltas.append(detok.push(ids[i : i + n]))
        i += n
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_concatenate_to_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = _stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas), deltas  # no half characters mid-stream


@pytest.mark.parametrize("text", TEXTS)
def test_prompt_context_and_uneven_chunks_give_same_text(tokenizer, text):
    rng = random.Random(len(text))
    prompt = tokenizer.encode("Prompt: say something.", add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    chunks = [rng.randint(1, 4) for _ in ids]
    deltas = _stream(tokenizer, ids, prompt, chunks)
    full = tokenizer.decode(prompt + ids)
    assert "".join(deltas) == full[len(tokenizer.decode(prompt)) :]
    assert not any("\ufffd" in d for d in deltas)


def test_byte_pieces_of_one_character_are_held_until_complete(tokenizer):
    ids = tokenizer.encode("🎉", add_special_tokens=False)
    if len(ids) < 2:
        pytest.skip("the tokenizer has the emoji as one token")
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1:]) == "🎉"


def test_incomplete_character_at_the_end_is_flushed(tokenizer):
    ids = tokenizer.encode("ab🎉", add_special_tokens=False)
    if len(tokenizer.encode("🎉", add_special_tokens=False)) < 2:
        pytest.skip("the tokenizer has the emoji as one token")
    detok = IncrementalDetokenizer(tokenizer)
    text = detok.push(ids[:-1]) + detok.flush()
    assert text == tokenizer.decode(ids[:-1])


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer.encode("Hi there", add_special_tokens=False) + list(tokenizer.eos_token_ids[:1])
    assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids) == "Hi there"


# ---------------------------------------------------------------- stop strings


def _feed_all(stops, pieces):
    m = StopMatcher(stops)
    out = [m.feed(p) for p in pieces]
    if not m.stopped:
        out.append(m.flush())
    return "".join(out), m.stopped, out


@pytest.mark.parametrize("split", [1, 2, 3, 5, 100])
def test_stop_string_cuts_output_wherever_pieces_split(split):
    text = "The answer is 42.\nEND of it"
    pieces = [text[i : i + split] for i in range(0, len(text), split)]
    out, stopped, _ = _feed_all(["\nEND"], pieces)
    assert (out, stopped) == ("The answer is 42.", True)


def test_earliest_of_several_stop_strings_wins():
    out, stopped, _ = _feed_all(["world", "lo w", "xyz"], ["hel", "lo wor", "ld"])
    assert (out, stopped) == ("hel", True)


def test_partial_stop_string_is_held_back_then_released():
    _, stopped, outs = _feed_all(["STOP"], ["abc ST", "O", "P"])
    assert stopped and outs[0] == "abc " and "".join(outs) == "abc "
    out, stopped, outs = _feed_all(["STOP"], ["abc ST", "OX", " done"])
    assert not stopped and out == "abc STOX done"
    assert outs[0] == "abc "  # "ST" was held until "X" ruled the stop string out


def test_held_back_text_is_released_at_the_end():
    out, stopped, outs = _feed_all(["</answer>"], ["x </ans"])
    assert (out, stopped) == ("x </ans", False)
    assert outs[0] == "x "


def test_no_stop_strings_passes_text_through():
    m = StopMatcher([])
    assert m.feed("abc") == "abc" and m.flush() == "" and not m.stopped


def test_nothing_after_a_stop():
    m = StopMatcher(["."])
    assert m.feed("a.b") == "a" and m.feed("more") == "" and m.flush() == ""


@pytest.mark.parametrize("seed", range(20))
def test_stop_matcher_agrees_with_a_plain_search(seed):
    rng = random.Random(seed)
    alphabet = "ab."
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(2)]
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(4, len(text) + 1)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[: min(hits)] if hits else text
    out, stopped, _ = _feed_all(stops, pieces)
    assert (out, stopped) == (expected, bool(hits))
