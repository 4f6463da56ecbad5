"""The tuned MoE tiles: the per-card JSON that perf/mla_moe_bench.py --sweep writes, read back by
fused_moe's lookup (nearest measured M, the routed shape's tiles for a weight with more experts,
the defaults where the card or the shape was never measured). CPU only: no kernel runs."""

from __future__ import annotations

import dataclasses
import importlib
import json

import pytest
import torch

from lightllm_async.kernels import MoeConfig

fm = importlib.import_module("lightllm_async.kernels.fused_moe")  # the package exports the function

V2_LITE = (64, 1408, 2048)  # E, I, H
V3 = (256, 2048, 7168)
CARD = "NVIDIA H200"
TILES = {  # M: tiles, distinct at every M so that a wrong bucket shows
    1: MoeConfig(16, 64, 256, 1, 4, 3),
    8: MoeConfig(16, 128, 64, 1, 4, 4),
    64: MoeConfig(32, 64, 128, 8, 4, 3),
    1024: MoeConfig(64, 128, 64, 8, 4, 4),
    8192: MoeConfig(128, 256, 64, 16, 8, 3),
}


def write_tuned(directory, device_name: str, shapes: dict) -> None:
    doc = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": "3.6.0",
        "shapes": {
            fm.moe_shape_key(*shape): {str(m): dataclasses.asdict(c) for m, c in tiles.items()}
            for shape, tiles in shapes.items()
        },
    }
    (directory / ("moe_" + device_name.replace(" ", "_") + ".json")).write_text(json.dumps(doc))


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    """A tuned/ holding tiles for the V2-Lite shape on CARD, and the card's tensors on CUDA."""
    monkeypatch.setattr(fm, "TUNED_DIR", str(tmp_path))
    monkeypatch.setattr(fm, "_device_name", lambda index: CARD)
    write_tuned(tmp_path, CARD, {V2_LITE: TILES})
    return tmp_path


def test_file_name_replaces_every_non_alphanumeric(monkeypatch):
    monkeypatch.setattr(fm, "TUNED_DIR", "/t")
    assert fm.tuned_file("NVIDIA H100 80GB HBM3") == "/t/moe_NVIDIA_H100_80GB_HBM3.json"
    assert fm.tuned_file("NVIDIA H200") == "/t/moe_NVIDIA_H200.json"


@pytest.mark.parametrize(
    "num_tokens, bucket",
    [(1, 1), (2, 1), (3, 8), (7, 8), (20, 8), (23, 64), (64, 64), (200, 64), (300, 1024), (5000, 8192)],
)
def test_tiles_of_the_measured_m_nearest_in_log_scale(tuned_dir, num_tokens, bucket):
    assert fm.tuned_moe_config(CARD, num_tokens, *V2_LITE) == TILES[bucket]
    assert fm.moe_config(num_tokens, 6, *V2_LITE, torch.device("cuda", 0)) == TILES[bucket]


def test_a_weight_with_shared_experts_appended_takes_the_routed_shape_tiles(tuned_dir):
    e, i, h = V2_LITE
    assert fm.tuned_moe_config(CARD, 8, e + 2, i, h) == TILES[8]
    assert fm.moe_config(8, 8, e + 2, i, h, torch.device("cuda", 0)) == TILES[8]


def test_an_exact_shape_wins_over_one_of_the_same_i_and_h(tuned_dir):
    e, i, h = V2_LITE
    fused = {1: MoeConfig(16, 32, 128, 1, 4, 5)}
    write_tuned(tuned_dir, "Fused Card", {V2_LITE: TILES, (e + 2, i, h): fused})
    assert fm.tuned_moe_config("Fused Card", 1000, e + 2, i, h) == fused[1]
    assert fm.tuned_moe_config("Fused Card", 1000, e, i, h) == TILES[1024]


def test_unmeasured_card_or_shape_falls_back_to_the_defaults(tuned_dir, monkeypatch):
    cuda = torch.device("cuda", 0)
    assert fm.tuned_moe_config("NVIDIA B200", 8, *V2_LITE) is None
    assert fm.tuned_moe_config(CARD, 8, *V3) is None  # another (I, H)
    assert fm.moe_config(8, 8, *V3, cuda) == fm.default_moe_config(64, V3[0], cuda)
    monkeypatch.setattr(fm, "_device_name", lambda index: "NVIDIA B200")
    assert fm.moe_config(8, 6, *V2_LITE, cuda) == fm.default_moe_config(48, V2_LITE[0], cuda)


def test_cpu_keeps_the_interpreter_tiles(tuned_dir):
    cpu = torch.device("cpu")
    assert fm.moe_config(8, 6, *V2_LITE, cpu) == fm.default_moe_config(48, V2_LITE[0], cpu)
