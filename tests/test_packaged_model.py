"""The packaged default model: it is installed, carries its card, loads safely and predicts without --model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from cdmap.checkpoint import load_checkpoint, save_checkpoint, with_half_weights
from cdmap.errors import CheckpointError, IncompatibleInputsError
from cdmap.weights import DEFAULT_MODEL, FOLDER, model_path, packaged_models, packaged_names
from tests.helpers import tiny_checkpoint

CARD_KEYS = {"name", "architecture", "backbone", "bands", "band_order", "gsd_m", "training_data", "licence",
             "recipe", "held_out", "threshold", "weights_dtype", "half_precision_check", "trained"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cdmap", *args], capture_output=True, text=True, timeout=300)


def test_default_model_is_packaged_small_and_carded():
    assert packaged_names()[0] == DEFAULT_MODEL
    path = model_path(None)
    assert path == FOLDER / f"{DEFAULT_MODEL}.pt" and path.is_file()
    ckpt = load_checkpoint(path)  # weights_only=True, like every checkpoint
    assert ckpt.training_state is None
    card = ckpt.card
    # half precision when the recipe measured that it changes nothing that matters, else fp32
    floats = [v for v in ckpt.state_dict.values() if v.is_floating_point()]
    assert floats and {str(v.dtype) for v in floats} == {f"torch.{card['weights_dtype']}"}
    assert card["half_precision_check"]["stored_half"] == (card["weights_dtype"] == "float16")
    assert path.stat().st_size < (8e6 if card["weights_dtype"] == "float16" else 16e6)
    assert CARD_KEYS <= set(card)
    assert card["bands"] == ["red", "green", "blue"] and ckpt.in_channels == 3
    assert "research" in card["licence"]
    assert {d["set"] for d in card["training_data"]} == {"LEVIR-CD", "DSIFN-CD", "SZTAKI AirChange"}
    assert all(d["pairs"] > 0 and "research" in d["licence"] for d in card["training_data"])
    assert ckpt.provenance["gsd_m"] == card["gsd_m"] and card["gsd_m"][0] < card["gsd_m"][1]
    for name in ("LEVIR-CD", "DSIFN-CD", "SZTAKI AirChange", "all"):  # held-out scores per set
        s = card["held_out"][name]
        assert s["pairs"] >= 1 and 0.0 <= s["f1"] <= 1.0 and 0.0 <= s["iou"] <= s["f1"]
    assert card["recipe"].startswith("python benchmarks/train_default.py")
    # the file is listed with its card
    [entry] = [e for e in packaged_models() if e["name"] == DEFAULT_MODEL]
    assert entry["default"] and entry["card"] == card


def test_half_weights_and_card_round_trip(tmp_path):
    import torch

    ckpt = load_checkpoint(tiny_checkpoint(tmp_path / "t.pt"))
    half = with_half_weights(ckpt)
    half.card = {"name": "t", "bands": ["red", "green", "blue"]}
    save_checkpoint(half, tmp_path / "h.pt")
    back = load_checkpoint(tmp_path / "h.pt")
    assert back.card == half.card
    assert (tmp_path / "h.pt").stat().st_size < (tmp_path / "t.pt").stat().st_size
    a, b = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        p32 = ckpt.build_model()(a, b)
        p16 = back.build_model()(a, b)
    p32 = p32[0] if isinstance(p32, (list, tuple)) else p32
    p16 = p16[0] if isinstance(p16, (list, tuple)) else p16
    assert next(back.build_model().parameters()).dtype == torch.float32  # loaded into the fp32 model
    assert float((p32.softmax(1) - p16.softmax(1)).abs().max()) < 5e-3


def test_model_path_names_and_files(tmp_path):
    assert model_path(DEFAULT_MODEL) == model_path(None)
    ckpt = load_checkpoint(tiny_checkpoint(tmp_path / "mine.pt"))
    assert model_path(ckpt.source) == ckpt.source
    assert model_path(str(ckpt.source)) == ckpt.source
    with pytest.raises(CheckpointError, match="neither a packaged model"):
        model_path("no-such-model")


def test_predict_without_model_on_a_synthetic_pair(tmp_path, make_pair):
    from cdmap.predict import predict_scene

    a, b, _ = make_pair(tmp_path, height=192, width=224)
    res = predict_scene(a, b, tmp_path / "out", quiet=True)
    summary = json.loads(res.run_json.read_text())
    assert summary["model"]["name"] == DEFAULT_MODEL
    assert summary["model"]["checkpoint"] == str(model_path(None))
    assert "research" in summary["model"]["licence"]
    with rasterio.open(res.probability) as p, rasterio.open(a) as src:
        assert p.shape == src.shape and p.crs == src.crs
        prob = p.read(1)
    assert prob.min() < prob.max()  # a real model, not a constant


def test_cli_models_info_and_unknown_name(tmp_path):
    res = _cli("models", "--json")
    assert res.returncode == 0, res.stderr
    entries = json.loads(res.stdout)
    assert entries[0]["name"] == DEFAULT_MODEL and entries[0]["default"] is True
    res = _cli("models")
    assert res.returncode == 0 and f"{DEFAULT_MODEL}  (default)" in res.stdout and "held out" in res.stdout
    res = _cli("info", DEFAULT_MODEL)
    assert res.returncode == 0, res.stderr
    assert "licence" in res.stdout and "LEVIR-CD" in res.stdout
    res = _cli("predict", "a.tif", "b.tif", "-o", str(tmp_path / "o"), "--model", "no-such-model")
    assert res.returncode == CheckpointError.exit_code
    assert len(res.stderr.strip().splitlines()) == 1 and "no-such-model" in res.stderr
    assert not (tmp_path / "o").exists()


def test_a_13_band_stack_is_refused_with_the_bands_that_fit(tmp_path, make_geotiff):
    from cdmap.predict import predict_scene

    rng = np.random.default_rng(0)
    data = rng.integers(0, 3000, size=(13, 64, 64), dtype=np.uint16)
    a = make_geotiff(tmp_path / "s2_1.tif", data)
    b = make_geotiff(tmp_path / "s2_2.tif", data[::-1].copy())
    with pytest.raises(IncompatibleInputsError, match=r"--bands 4,3,2 for a 13-band Sentinel-2"):
        predict_scene(a, b, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_python_api_mirrors_the_cli():
    import cdmap

    ckpt = cdmap.load_model()
    assert ckpt.source == model_path(None) and ckpt.card["name"] == DEFAULT_MODEL
    assert [e["name"] for e in cdmap.packaged_models()] == packaged_names()


def test_a_pixel_size_far_outside_the_cards_range_is_warned(tmp_path, make_pair):
    from rasterio.transform import from_origin

    from cdmap.predict import predict_scene

    a, b, _ = make_pair(tmp_path, height=96, width=96, transform=from_origin(500000.0, 4000000.0, 30.0, 30.0))
    run = predict_scene(a, b, tmp_path / "out", quiet=True, report=False).summary
    assert [w for w in run["warnings"] if "pixel size 30 m" in w and "0.5-2 m" in w]
