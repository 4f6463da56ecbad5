"""The README's table of server flags states each default that the parser really has: a row whose
default is one literal (`--max-num-batched-tokens` | `1024`) must match build_parser()'s default."""

import os
import re

from lightllm_async.server import build_parser

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
ROW = re.compile(r"^\| `(--[a-z0-9-]+)(?:\\\||[^|])*\| `([^`]+)` \|")  # a cell may hold escaped pipes


def test_readme_flag_defaults_are_the_parsers():
    actions = {opt: a for a in build_parser()._actions for opt in a.option_strings}
    with open(README) as f:
        rows = [m.groups() for line in f if (m := ROW.match(line))]
    assert len(rows) >= 15, "the README's flag table was not found"
    checked = []
    for flag, default in rows:
        action = actions.get(flag)
        assert action is not None, f"README documents {flag}, which the server does not take"
        if action.default is None or isinstance(action.default, bool):
            continue  # a computed default or a switch: described in words
        same = str(action.default) == default
        if isinstance(action.default, (int, float)):
            same = re.fullmatch(r"-?[0-9.]+", default) is not None and float(default) == action.default
        assert same, f"{flag}: README says {default}, the parser {action.default}"
        checked.append(flag)
    assert {"--num-slots", "--gpu-memory-utilization", "--kv-cache-dtype"} <= set(checked)


def test_the_default_chunk_is_1024_on_a_gpu_and_2048_on_the_cpu(monkeypatch):
    from lightllm_async import server

    def chunk(*flags):
        args = build_parser().parse_args(["--model", "dummy", *flags])
        return server.resolve_config(args).engine.max_num_batched_tokens

    assert chunk("--device", "cpu") == 2048 and chunk("--device", "cuda:1") == 1024
    assert chunk("--device", "cpu", "--max-num-batched-tokens", "512") == 512
    for present, want in ((True, 1024), (False, 2048)):  # "auto": what the CUDA driver says
        monkeypatch.setattr(server, "cuda_present", lambda present=present: present)
        assert chunk() == want
    monkeypatch.undo()
    assert isinstance(server.cuda_present(), bool)  # the probe itself: no GPU here, no error
