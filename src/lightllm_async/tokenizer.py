"""Text <-> token ids and chat-template rendering for the frontend.

Torch-free and transformers-free: built on the `tokenizers` library and jinja2, from a HF folder
(tokenizer.json, tokenizer_config.json, generation_config.json) or a GGUF file's metadata.
Encoding, decoding and chat rendering match transformers' `AutoTokenizer` on the same files.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import cached_property, lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, processors

# Turn-ending tokens: when a chat template writes one of these, generation stops on it too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class Tokenizer:
    """A loaded tokenizer: encode/decode, chat template, special ids. Build it with `load_tokenizer`."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: dict[str, str | None],
        eos_token_ids: tuple[int, ...],
        chat_template: str | None = None,
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        self.backend = backend
        self.special_tokens = special_tokens  # bos_token, eos_token, unk_token, pad_token -> text
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.bos_token_id: int | None = self._id(special_tokens.get("bos_token"))
        self.eos_token_ids: tuple[int, ...] = eos_token_ids
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        specials = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        named = {self._id(t) for t in special_tokens.values()}
        self.all_special_ids: list[int] = sorted(specials | (named - {None}))

    @property
    def eos_token_id(self) -> int | None:
        """The primary EOS id (the first of `eos_token_ids`)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text are matched whole."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_nogil(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`encode`, releasing the GIL while the tokenizer runs (for a helper thread): the library's
        single-text encode holds it throughout, its batch encode does not."""
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    @cached_property
    def max_bytes_per_token(self) -> int | None:
        """An upper bound on the UTF-8 bytes of input text that one token stands for, or None when
        the pipeline may drop or shrink text without bound (then no such bound exists).

        A text longer than `n` times this many bytes encodes to more than `n` tokens.
        """
        normalizer, pre_tokenizer = (
            None if part is None else json.loads(part.__getstate__())
            for part in (self.backend.normalizer, self.backend.pre_tokenizer)
        )
        shrink = _shrink_factor(normalizer)
        if shrink is None or not _keeps_all_text(pre_tokenizer) or not _bounded_unknowns(self.backend.model):
            return None
        byte_level = '"ByteLevel"' in json.dumps(pre_tokenizer)
        alphabet = _byte_alphabet() if byte_level else frozenset()
        # Byte-level vocabularies spell each byte as one character; added tokens match raw text.
        longest = max(
            (len(t) if t.isascii() or set(t) <= alphabet else len(t.encode()))
            for t in self.backend.get_vocab(with_added_tokens=False)
        )
        added = [t.content for t in self.backend.get_added_tokens_decoder().values()]
        longest = max([longest, 4, *(len(t.encode()) for t in added)])  # 4: an unknown character
        return shrink * longest

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def decode_nogil(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """`decode`, releasing the GIL while the tokenizer runs (for a helper thread), as
        `encode_nogil` does."""
        text = self.backend.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0]
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        """Vocabulary strings (byte-level spelling, e.g. 'Ġworld'); None for ids beyond the vocab."""
        return [self.backend.id_to_token(i) for i in ids]

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` with the model's chat template, as transformers'
        `apply_chat_template(..., tokenize=False)` does. Extra keyword arguments (tools, ...) reach
        the template as variables."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; use a completion endpoint instead")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.special_tokens, "tools": None, "documents": None, **kwargs}
        return compile_chat_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )


def load_tokenizer(model_path: str) -> Tokenizer:
    """The tokenizer of a HF folder (tokenizer.json) or of a .gguf file."""
    if str(model_path).lower().endswith(".gguf"):
        return _load_gguf(model_path)
    if os.path.isfile(os.path.join(model_path, "tokenizer.json")):
        return _load_hf_folder(model_path)
    raise FileNotFoundError(f"{model_path!r} is neither a .gguf file nor a folder with tokenizer.json")


# -- GGUF ------------------------------------------------------------------------------------


def _load_gguf(path: str) -> Tokenizer:
    # Torch-free modules; the import is local so HF-folder users never pay for the gguf package.
    from lightllm_async.formats.gguf_file import GGUFFile
    from lightllm_async.formats.gguf_tokenizer import build_gguf_tokenizer

    meta = GGUFFile(path).metadata
    tokens: list[str] = meta["tokenizer.ggml.tokens"]

    def text(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    specials = {
        "bos_token": text("bos_token_id"),
        "eos_token": text("eos_token_id"),
        "unk_token": text("unknown_token_id"),
        "pad_token": text("padding_token_id"),
    }
    backend = build_gguf_tokenizer(meta)
    template = meta.get("tokenizer.chat_template")
    declared = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos = _eos_ids(backend, declared, template)
    return Tokenizer(backend, special_tokens=specials, eos_token_ids=eos, chat_template=template)


# -- HF folder -------------------------------------------------------------------------------


def _load_hf_folder(path: str) -> Tokenizer:
    backend = BackendTokenizer.from_file(os.path.join(path, "tokenizer.json"))
    cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
    specials = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    if cfg.get("add_bos_token") and specials["bos_token"]:
        _ensure_bos(backend, specials["bos_token"])
    gen = _read_json(os.path.join(path, "generation_config.json"))
    declared = [backend.token_to_id(specials["eos_token"]) if specials["eos_token"] else None]
    declared += (
        gen.get("eos_token_id") if isinstance(gen.get("eos_token_id"), list) else [gen.get("eos_token_id")]
    )
    template = _hf_chat_template(path, cfg)
    return Tokenizer(
        backend,
        special_tokens=specials,
        eos_token_ids=_eos_ids(backend, declared, template),
        chat_template=template,
        clean_up_tokenization_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)),
    )


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _hf_chat_template(path: str, cfg: dict[str, Any]) -> str | None:
    """chat_template.jinja (transformers >= 4.43 saves it there) or tokenizer_config's entry,
    which may be a list of named templates."""
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def _ensure_bos(backend: BackendTokenizer, bos: str) -> None:
    """`add_bos_token: true` without a post-processor that adds it (LlamaTokenizerFast style):
    install one. When tokenizer.json already adds it (Llama 3), leave it so BOS is not doubled."""
    bos_id = backend.token_to_id(bos)
    if bos_id is None or backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]:
        return
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )


# -- shared ----------------------------------------------------------------------------------

_UNICODE_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase"}
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "Split", "UnicodeScripts"}


def _shrink_factor(normalizer: dict[str, Any] | None) -> int | None:
    """How many times fewer bytes a normalizer may leave of a text, at most; None: unbounded."""
    if normalizer is None:
        return 1
    kind = normalizer["type"]
    if kind == "Sequence":
        factor = 1
        for child in normalizer["normalizers"]:
            f = _shrink_factor(child)
            if f is None:
                return None
            factor *= f
        return factor
    if kind == "Prepend":
        return 1
    if kind == "Replace":  # e.g. " " -> "▁" (sentencepiece style) only grows the text
        pattern = normalizer["pattern"].get("String")
        grows = pattern is not None and len(normalizer["content"].encode()) >= len(pattern.encode())
        return 1 if grows else None
    if kind in _UNICODE_NORMALIZERS:
        # A character of 4 bytes may become one of 1 byte (NFKC, case folding); composition joins
        # at most three 3-byte Hangul jamo into one 3-byte syllable.
        return 4
    return None  # Strip, BertNormalizer, Precompiled, ...: may remove text


def _keeps_all_text(pre_tokenizer: dict[str, Any] | None) -> bool:
    """Whether a pre-tokenizer passes every character on (whitespace splitters drop some)."""
    if pre_tokenizer is None:
        return True
    if pre_tokenizer["type"] == "Sequence":
        return all(_keeps_all_text(p) for p in pre_tokenizer["pretokenizers"])
    return pre_tokenizer["type"] in _KEEPING_PRE_TOKENIZERS and pre_tokenizer.get("behavior") != "Removed"


def _bounded_unknowns(model: Any) -> bool:
    """A BPE model maps an unknown character to one token, unless it fuses runs of them into one."""
    if not isinstance(model, models.BPE):
        return False
    return not (model.unk_token and model.fuse_unk and not model.byte_fallback)


@lru_cache(maxsize=1)
def _byte_alphabet() -> frozenset[str]:
    from lightllm_async.formats.gguf_tokenizer import bytes_to_unicode

    return frozenset(bytes_to_unicode().values())


def _eos_ids(backend: BackendTokenizer, declared: list[Any], template: str | None) -> tuple[int, ...]:
    """Declared EOS ids first, then turn-ending tokens the chat template writes (e.g. <|im_end|>)."""
    ids = [int(i) for i in declared if i is not None]
    for token in END_OF_TURN_TOKENS:
        token_id = backend.token_to_id(token)
        if template and token in template and token_id is not None:
            ids.append(token_id)
    return tuple(dict.fromkeys(ids))


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (only for tokenizers that ask for it)."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """A chat template compiled in the sandboxed environment transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
