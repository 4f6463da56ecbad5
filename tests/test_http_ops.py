"""Issue 11, endpoints and operations, in-process: /tokenize and /detokenize in vLLM's shapes,
/openapi.json generated from the msgspec Structs, and --api-key.

The app is test_frontend_app's harness (a real region, the real engine with a scripted runner);
requests with exact headers go through tests/asgi_client.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi

from asgi_client import JSON, call
from lightllm_async.frontend.app import served_routes
from lightllm_async.frontend.auth import OPEN_PATHS
from test_frontend_app import MAX_MODEL_LEN, Harness


@pytest.fixture(scope="module")
def tokenizer():
    from lightllm_async.models.loader import default_model_path
    from lightllm_async.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path())


def run(coro):
    return asyncio.run(coro)


def random_text(rng: random.Random, n: int) -> str:
    """Text that exercises the tokenizer: several scripts, emoji, whitespace runs, special tokens."""
    pieces = [
        "a",
        "Z",
        "é",
        "ß",
        "日本",
        "🎉",
        "👩‍💻",
        " ",
        "  ",
        "\n",
        "\t",
        "42",
        "<|im_end|>",
        "<|im_start|>",
        "ü",
    ]
    return "".join(rng.choice(pieces) for _ in range(n))


# ---------------------------------------------------------------- /tokenize, /detokenize


def test_tokenize_then_detokenize_gives_back_the_text(tokenizer):
    rng = random.Random()
    texts = ["Hello, world!", "x", *(random_text(rng, n) for n in (1, 7, 257, 1031))]

    async def go():
        async with Harness(tokenizer) as h:
            for text in texts:
                r = await h.request("POST", "/tokenize", {"prompt": text})
                assert r.status == 200, r.body
                out = r.json()
                assert out["tokens"] == tokenizer.encode(text, add_special_tokens=True)
                assert out["count"] == len(out["tokens"]) and out["max_model_len"] == MAX_MODEL_LEN
                assert "token_strs" not in out
                r = await h.request("POST", "/detokenize", {"tokens": out["tokens"]})
                assert r.status == 200 and r.json() == {"prompt": text}, (text, r.body)

    run(go())


def test_tokenize_messages_renders_the_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
    ]
    rendered = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi\nthere"}]

    async def go():
        async with Harness(tokenizer) as h:
            for gen_prompt in (True, False):
                r = await h.request(
                    "POST",
                    "/tokenize",
                    {"messages": messages, "add_generation_prompt": gen_prompt, "return_token_strs": True},
                )
                assert r.status == 200, r.body
                out = r.json()
                text = tokenizer.apply_chat_template(rendered, add_generation_prompt=gen_prompt)
                assert out["tokens"] == tokenizer.encode(text, add_special_tokens=False)
                assert out["token_strs"] == tokenizer.convert_ids_to_tokens(out["tokens"])
                assert out["count"] == len(out["tokens"])
                # special tokens are spelled out, so the rendered chat comes back whole
                r = await h.request("POST", "/detokenize", {"tokens": out["tokens"]})
                assert r.json() == {"prompt": text}
            assert text.endswith("<|im_end|>\n")  # the last round: no generation prompt

    run(go())


class _RecordingTokenizer:
    """The real tokenizer, noting the add_special_tokens of every encode."""

    def __init__(self, tok):
        self._tok = tok
        self.special: list[bool] = []

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text, add_special_tokens=True):
        self.special.append(add_special_tokens)
        return self._tok.encode(text, add_special_tokens=add_special_tokens)


def test_add_special_tokens_defaults_as_vllm_and_is_honoured(tokenizer):
    rec = _RecordingTokenizer(tokenizer)
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        ({"prompt": "hi"}, True),
        ({"prompt": "hi", "add_special_tokens": False}, False),
        ({"messages": msgs}, False),  # the template writes them
        ({"messages": msgs, "add_special_tokens": True}, True),
    ]

    async def go():
        async with Harness(rec) as h:
            for body, special in cases:
                r = await h.request("POST", "/tokenize", body)
                assert r.status == 200 and rec.special[-1] is special, body

    run(go())


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": None}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/tokenize", {"messages": "hi"}, "messages"),
        ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
        ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens"),
        ("/tokenize", {"prompt": "x" * (8 * 1024 * 1024 - 100)}, "prompt"),  # can never fit the context
        ("/detokenize", {}, "tokens"),
        ("/detokenize", {"tokens": "1 2"}, "tokens"),
        ("/detokenize", {"tokens": [1, 2.5]}, "tokens[1]"),
        ("/detokenize", {"tokens": [1, True]}, "tokens[1]"),
        ("/detokenize", {"tokens": [7, -1]}, "tokens[1]"),
        ("/detokenize", {"tokens": [3, 4, 49152]}, "tokens[2]"),  # the vocabulary is [0, 49152)
        ("/detokenize", {"tokens": [2**70]}, "tokens[0]"),
    ],
)
def test_bad_tokenize_input_is_a_400_error_object(tokenizer, path, body, param):
    async def go():
        async with Harness(tokenizer) as h:
            r = await h.request("POST", path, body)
            assert r.status == 400, r.body
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["code"] == 400 and err["message"]
            if param is not None:
                assert err["param"] == param, err
            else:
                assert err["param"].startswith("messages[0].content")
            # the server goes on
            assert (await h.request("POST", "/detokenize", {"tokens": [3]})).status == 200

    run(go())


def test_detokenize_of_nothing_is_empty_and_a_long_list_decodes_off_the_loop(tokenizer):
    rng = random.Random()
    long = [rng.randrange(tokenizer.vocab_size) for _ in range(20011)]  # past the inline bound

    async def go():
        async with Harness(tokenizer) as h:
            assert (await h.request("POST", "/detokenize", {"tokens": []})).json() == {"prompt": ""}
            r = await h.request("POST", "/detokenize", {"tokens": long})
            assert r.json()["prompt"] == tokenizer.decode(long, skip_special_tokens=False)
            assert (await h.request("GET", "/tokenize")).status == 405

    run(go())


# ---------------------------------------------------------------- /openapi.json


def all_refs(node) -> list[str]:
    if isinstance(node, dict):
        return [r for k, v in node.items() for r in ([v] if k == "$ref" else all_refs(v))]
    if isinstance(node, list):
        return [r for v in node for r in all_refs(v)]
    return []


def resolve(doc: dict, ref: str):
    assert ref.startswith("#/"), ref
    node = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def schema_of(doc: dict, ref: dict) -> Draft202012Validator:
    """A validator for the component `ref` points at, resolving refs inside the document."""
    return Draft202012Validator({**ref, "components": doc["components"]})


async def get_openapi(h: Harness) -> dict:
    r = await h.request("GET", "/openapi.json")
    assert r.status == 200 and r.headers["content-type"] == "application/json"
    return r.json()


def test_openapi_describes_every_route_the_app_serves_and_nothing_else(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:
            doc = await get_openapi(h)
            described = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
            served = {(p, m) for p, ms in served_routes().items() for m in ms}
            assert described == served
            assert {"/tokenize", "/detokenize", "/openapi.json", "/metrics", "/health"} <= set(doc["paths"])
            # each of them is answered: none is a 404 or 405
            for path, method in served:
                r = await h.request(method, path, {} if method == "POST" else None)
                assert r.status not in (404, 405), (path, method, r.status)

    run(go())


def test_openapi_is_a_valid_document_whose_refs_resolve(tokenizer):
    async def go():
        async with Harness(tokenizer) as h:
            doc = await get_openapi(h)
            validate_openapi(doc)  # OpenAPI 3.1, its JSON Schemas included
            refs = all_refs(doc)
            assert len(refs) > 40
            for ref in refs:
                assert isinstance(resolve(doc, ref), dict), ref
            for schema in doc["components"]["schemas"].values():
                Draft202012Validator.check_schema(schema)
            for path, ops in doc["paths"].items():
                for method, op in ops.items():
                    error = op["responses"]["default"]["content"]["application/json"]["schema"]
                    assert error == {"$ref": "#/components/schemas/ErrorResponse"}, (path, method)
                    assert "security" not in op and "401" not in op["responses"]  # no --api-key
                    if method == "post":
                        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                        assert {"400", "413", "415"} <= set(op["responses"])

    run(go())


def test_responses_match_the_schemas_the_document_gives(tokenizer):
    """What the server answers validates against the schemas /openapi.json names for it."""

    async def go():
        async with Harness(tokenizer) as h:
            doc = await get_openapi(h)
            requests = [
                ("POST", "/tokenize", {"prompt": "hi", "return_token_strs": True}, 200),
                ("POST", "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}, 200),
                ("POST", "/detokenize", {"tokens": [5, 6]}, 200),
                ("POST", "/detokenize", {"tokens": [-5]}, 400),
                ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3}, 200),
                ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 200),
                ("POST", "/generate", {"inputs": "hi"}, 200),
                ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400),
                ("GET", "/v1/models", None, 200),
                ("GET", "/health", None, 200),
            ]
            for method, path, body, status in requests:
                r = await h.request(method, path, body)
                assert r.status == status, (path, r.body)
                responses = doc["paths"][path][method.lower()]["responses"]
                schema = responses[str(status)]["content"]["application/json"]["schema"]
                schema_of(doc, schema).validate(r.json())
            # a stream's events validate against the event schema
            body = {
                "prompt": "hi",
                "max_tokens": 4,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            r = await h.request("POST", "/v1/completions", body)
            media = doc["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
            events = r.events()
            assert events[-1] == "[DONE]"
            for e in events[:-1]:
                schema_of(doc, media["text/event-stream"]["x-event-schema"]).validate(json.loads(e))

    run(go())


# ---------------------------------------------------------------- --api-key

KEY = "sk-test-" + "".join(random.choice("abcdef0123456789") for _ in range(24))

# One request per protected route, each answered 200 given the key.
PROTECTED = [
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True}),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}),
    ("GET", "/v1/models", None),
    ("POST", "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2}}),
    ("POST", "/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 2}}),
    ("POST", "/tokenize", {"prompt": "x"}),
    ("POST", "/detokenize", {"tokens": [5]}),
]
WRONG = [
    (),
    ((b"authorization", b"Bearer " + KEY[:-1].encode()),),
    ((b"authorization", b"Bearer " + KEY.encode() + b"x"),),
    ((b"authorization", b"Basic " + KEY.encode()),),
    ((b"authorization", KEY.encode()),),
    ((b"authorization", b"Bearer"),),
    ((b"x-api-key", KEY.encode()),),
]


def test_every_protected_route_needs_the_key(tokenizer, caplog):
    caplog.set_level(logging.DEBUG)

    async def go():
        async with Harness(tokenizer, api_key=KEY) as h:
            assert {p for _, p, _ in PROTECTED} | OPEN_PATHS == set(served_routes())  # all covered
            for method, path, body in PROTECTED:
                raw = b"" if body is None else json.dumps(body).encode()
                for wrong in WRONG:
                    r = await call(h.app, method, path, raw, (JSON, *wrong))
                    assert r.status == 401, (path, wrong, r.body)
                    assert r.json() == {
                        "error": {
                            "message": r.json()["error"]["message"],
                            "type": "invalid_request_error",
                            "param": None,
                            "code": "invalid_api_key",
                        }
                    }
                    assert r.headers["www-authenticate"] == "Bearer"
                for scheme in (b"Bearer ", b"bearer "):
                    r = await call(
                        h.app, method, path, raw, (JSON, (b"authorization", scheme + KEY.encode()))
                    )
                    assert r.status == 200, (path, r.body)
            assert h.engine.submitted, "the authorized requests reached the engine"
            # the open routes need no key
            for path in sorted(OPEN_PATHS):
                r = await call(h.app, "GET", path, b"", ())
                assert r.status == 200, (path, r.body)
            # an unknown route without the key does not say whether it exists
            assert (await call(h.app, "GET", "/v1/secret", b"", ())).status == 401

    run(go())
    assert KEY not in caplog.text


def test_a_secured_openapi_marks_the_protected_routes(tokenizer):
    async def go():
        async with Harness(tokenizer, api_key=KEY) as h:
            r = await call(h.app, "GET", "/openapi.json", b"", ())
            doc = r.json()
            validate_openapi(doc)
            assert KEY not in r.body.decode()
            assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in doc["paths"].items():
                for op in ops.values():
                    locked = path not in OPEN_PATHS
                    assert ("security" in op) is locked and ("401" in op["responses"]) is locked, path
            assert KEY not in repr(h.ctx)

    run(go())
