"""Build a `tokenizers.Tokenizer` from a GGUF file's tokenizer metadata. Torch-free.

A GGUF has no tokenizer.json: it stores tokens, merges, token types and ids under llama.cpp key
names. For `tokenizer.ggml.model == "gpt2"` (byte-level BPE) this rebuilds what transformers'
GGUF converter builds (GPT2-style BPE, control tokens as special added tokens, user-defined ones
as plain added tokens), with one deliberate difference: the pre-tokenizer follows
`tokenizer.ggml.pre` the way llama.cpp does, including "smollm" (digits split one by one, as in
SmolLM2's own tokenizer.json), which transformers does not know and treats as plain GPT-2.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
# llama.cpp pre-types that split every digit off before the GPT-2 regex
_DIGIT_SPLIT_PRES = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def build_gguf_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer a GGUF's metadata describes (byte-level BPE files only)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise NotImplementedError(
            f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE); "
            "use the model's HF folder with tokenizer.json instead"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=_byte_level_vocab(tokens), merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizer_for(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    _add_typed_tokens(tok, tokens, meta.get("tokenizer.ggml.token_type") or [])
    tok.post_processor = _post_processor(meta, tokens)
    return tok


def _byte_level_vocab(tokens: list[str]) -> dict[str, int]:
    """token -> id, respelling the few tokens not already written in the byte alphabet."""
    alphabet = set(bytes_to_unicode().values())
    spell = bytes_to_unicode()
    return {
        t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }


def pre_tokenizer_for(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer matching llama.cpp's `tokenizer.ggml.pre` type."""
    if pre in _SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _add_typed_tokens(tok: Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens, so that
    both are matched whole in text. A control token outside the byte alphabet is a llama.cpp
    mislabel and is left alone (as transformers does)."""
    alphabet = set(bytes_to_unicode().values())
    control = [t for t, k in zip(tokens, types, strict=True) if k == CONTROL and set(t) <= alphabet]
    user = [
        t for t, k in zip(tokens, types, strict=True) if k == USER_DEFINED and tok.token_to_id(t) is not None
    ]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _post_processor(meta: dict[str, Any], tokens: list[str]) -> processors.PostProcessor:
    """Adds BOS / EOS around a single sequence when the file asks for it."""
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = (["$A"] if not add_bos else [tokens[bos], "$A"]) + ([tokens[eos]] if add_eos else [])
    specials = [(tokens[i], i) for i, on in ((bos, add_bos), (eos, add_eos)) if on]
    return processors.TemplateProcessing(
        single=" ".join(single), special_tokens=list(dict.fromkeys(specials))
    )
