"""tokenizer.py against transformers' AutoTokenizer on the SmolLM2 GGUF and on a random HF folder."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import pre_tokenizers, processors

from lightllm_async.models.loader import default_model_path
from lightllm_async.tokenizer import load_tokenizer
from lightllm_async.tools import make_random_model as mrm

STRINGS = [
    "Hello, world!",
    "",
    " ",
    "x",
    "   leading and trailing   ",
    "tabs\tand\t\ttabs",
    "a\n\n\nb\r\nc\rd",
    "Héllo wörld — ünïcödé ✓ façade naïve",
    "e\u0301 combining, zero\u200bwidth, nbsp\u00a0here",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "مرحبا بالعالم שלום עולם",
    "emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧 end",
    "def f(x):\n\treturn x**2  # square\n\n    if x > 0:\n        pass",
    '{"key": [1, 2.5, -3e10], "url": "https://example.com/a?b=c&d=e"}',
    "I'm sure they're right, aren't they? We'll see; you'd've known.",
    "price: $3.50 , ok . 1,000,000 and 3.14159 or 0x1F",
    "year 2024!1+1=2 abc123def",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|><|im_start|>",
    "partial <|im_ and <|im_end| and im_end|> tokens",
    "<repo_name>foo<file_sep>bar.py<jupyter_code>x=1",
    "  42 spaces before digits\t\t7 and \n  9",
    "\x00\x01 control bytes \x7f",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why? 🐔\n  Explain   carefully."},
    ],
    [{"role": "system", "content": ""}, {"role": "user", "content": "<|im_end|> inside"}],
]
# transformers knows no "smollm" pre-tokenizer and splits with plain GPT-2 rules; llama.cpp and
# SmolLM2's own tokenizer.json split digits off first. The two only differ on 2+ blanks before a digit.
_BLANKS_BEFORE_DIGIT = re.compile(r"\s\s\d")


@pytest.fixture(scope="module")
def gguf_path() -> str:
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ours(gguf_path):
    return load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def ref(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))


@pytest.fixture(scope="module")
def ref_smollm2_split(ref) -> BackendTokenizer:
    """transformers' vocabulary, merges and special tokens with SmolLM2's real pre-tokenizer."""
    backend = BackendTokenizer.from_str(ref.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return backend


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return mrm.make_random_model("tiny", str(tmp_path_factory.mktemp("tiny")), seed=1)


def test_gguf_encode_matches_transformers(ours, ref):
    compared = [s for s in STRINGS if not _BLANKS_BEFORE_DIGIT.search(s)]
    assert len(compared) >= len(STRINGS) - 1
    for s in compared:
        assert ours.encode(s) == ref.encode(s), s
        assert ours.encode(s, add_special_tokens=False) == ref.encode(s, add_special_tokens=False), s


def test_gguf_splits_digits_like_smollm2(ours, ref_smollm2_split):
    for s in STRINGS:
        assert ours.encode(s) == ref_smollm2_split.encode(s).ids, s
    assert ours.convert_ids_to_tokens(ours.encode("  123")) == ["ĠĠ", "1", "2", "3"]


def test_gguf_encode_matches_on_random_text(ours, ref_smollm2_split):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    pool = "abcXYZ 019\t\n.,'!é中😀<|>_" + "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(40))
    for _ in range(200):
        s = "".join(rng.choices(pool, k=rng.randint(1, 40)))
        assert ours.encode(s) == ref_smollm2_split.encode(s).ids, f"seed {seed}: {s!r}"


def test_gguf_decode_matches_transformers(ours, ref):
    for s in STRINGS:
        ids = ref.encode(s)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), s
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    specials = [0, 1, 2, 16, 28120]
    assert ours.decode(specials) == ref.decode(specials, skip_special_tokens=True) == "hello"


def test_gguf_chat_template_matches_transformers(ours, ref):
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == want


def test_gguf_special_ids(ours, ref):
    assert ours.bos_token_id == ref.bos_token_id == 1
    assert ours.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
    assert ours.eos_token_ids == (2,)  # GGUF eos is <|im_end|>, the template's turn end
    assert ours.vocab_size == len(ref) == 49152
    assert ours.all_special_ids == list(range(17))  # the 17 control tokens of the file


def test_hf_folder_matches_transformers(tiny_dir):
    from transformers import AutoTokenizer

    ours, ref = load_tokenizer(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    for s in STRINGS:
        ids = ours.encode(s)
        assert ids == ref.encode(s), s
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), s
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), s
    for messages in CONVERSATIONS:
        want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(messages) == want
    assert (ours.bos_token_id, ours.eos_token_ids, ours.vocab_size) == (1, (2,), 512)


def _copy_tokenizer(src: str, dst: str, **config_changes) -> str:
    os.makedirs(dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(src, name), dst)
    path = Path(dst, "tokenizer_config.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    return dst


def test_add_bos_token_adds_bos_once(tiny_dir, tmp_path):
    asked = load_tokenizer(_copy_tokenizer(tiny_dir, str(tmp_path / "a"), add_bos_token=True))
    assert asked.encode("hello")[:2].count(1) == 1 and asked.encode("hello")[0] == 1
    assert asked.encode("hello", add_special_tokens=False)[0] != 1
    both = _copy_tokenizer(tiny_dir, str(tmp_path / "b"), add_bos_token=True)
    backend = BackendTokenizer.from_file(os.path.join(both, "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    backend.save(os.path.join(both, "tokenizer.json"))
    ids = load_tokenizer(both).encode("hello")
    assert ids[0] == 1 and ids[1] != 1


def test_eos_ids_join_generation_config_and_template(tiny_dir, tmp_path):
    d = _copy_tokenizer(tiny_dir, str(tmp_path / "t"), eos_token="<|endoftext|>")
    Path(d, "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    assert load_tokenizer(d).eos_token_ids == (0, 2)
    d2 = _copy_tokenizer(tiny_dir, str(tmp_path / "u"), eos_token="<|endoftext|>")
    os.remove(os.path.join(d2, "generation_config.json"))
    assert load_tokenizer(d2).eos_token_ids == (0, 2)  # <|im_end|> found in the chat template


def test_chat_template_helpers(tiny_dir, tmp_path):
    template = (
        "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
        "{{ strftime_now('%Y') }}\n{{ messages[0] | tojson }}\n{{ bos_token }}"
    )
    d = _copy_tokenizer(tiny_dir, str(tmp_path / "t"), chat_template=template)
    tok = load_tokenizer(d)
    year, as_json, bos = tok.apply_chat_template([{"role": "user", "content": "<é>", "name": None}]).split(
        "\n"
    )
    assert (
        int(year) >= 2024
        and json.loads(as_json) == {"role": "user", "content": "<é>"}
        and bos == "<|im_start|>"
    )
    assert "<é>" in as_json  # plain JSON, not HTML-escaped or ASCII-escaped
    with pytest.raises(jinja2.TemplateError, match="one message only"):
        tok.apply_chat_template([{"role": "user", "content": "a"}] * 2)


@pytest.mark.parametrize("which", ["gguf", "folder"])
def test_tokenizer_and_config_load_without_torch_or_gguf_package(request, tiny_dir, which):
    """The frontend process stays torch-free, and neither path needs the gguf package."""
    path = request.getfixturevalue("gguf_path") if which == "gguf" else tiny_dir
    code = (
        "import sys\n"
        "sys.modules['gguf'] = None  # makes `import gguf` fail\n"
        "from lightllm_async.tokenizer import load_tokenizer\n"
        "from lightllm_async.models.loader import load_model_config\n"
        f"assert load_tokenizer({path!r}).encode('hi') and load_model_config({path!r}).num_layers\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
