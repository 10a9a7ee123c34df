"""Execution backends: exact vs the torch fp32 reference, export cache, fallback to torch, the auto rule."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cdmap import backends
from cdmap.backends import export
from cdmap.checkpoint import Checkpoint
from cdmap.inference import Predictor
from cdmap.models import FSGNet, ModelConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXPORTED = [b for b in ("onnxruntime", "openvino") if backends.installed(b)]


@pytest.fixture(scope="module")
def ckpt() -> Checkpoint:
    torch.manual_seed(0)
    model = FSGNet(ModelConfig())
    with torch.no_grad():
        for block in model.stsam:
            block.cross.gamma.fill_(0.5)  # the attention branch contributes, as in a trained model
    return Checkpoint(ModelConfig(), model.state_dict(), [110.0] * 3, [50.0] * 3, tile_size=64)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CDMAP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _batch(n: int = 2, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, 3, size, size), dtype=np.float32)
    return a, (a + rng.standard_normal(a.shape, dtype=np.float32)).astype(np.float32)


def _reference(ckpt: Checkpoint, a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    """The explicit-attention torch fp32 forward: the oracle for every backend."""
    model = ckpt.build_model("cpu")
    model.set_attention("explicit")
    with torch.inference_mode():
        return torch.softmax(model(torch.from_numpy(a), torch.from_numpy(b)), dim=1)[:, 1]


def test_torch_backend_matches_explicit_reference(ckpt, cache):
    a, b = _batch()
    pred = Predictor.from_checkpoint(ckpt, "cpu", "fp32", backend="torch")
    assert pred.backend == "torch"
    assert (pred.probability(a, b) - _reference(ckpt, a, b)).abs().max() <= 1e-5
    assert not cache.exists()  # torch exports nothing


@pytest.mark.parametrize("name", EXPORTED)
def test_exported_backend_is_exact_and_cached(ckpt, cache, name, monkeypatch):
    a, b = _batch()
    pred = Predictor.from_checkpoint(ckpt, "cpu", "fp32", backend=name)
    prob = pred.probability(a, b)
    assert pred.backend == name and isinstance(prob, torch.Tensor) and prob.dtype == torch.float32
    assert prob.shape == (2, 64, 64)
    assert (prob - _reference(ckpt, a, b)).abs().max() <= 1e-4
    assert (pred.probability(a[:1], b[:1]) - prob[:1]).abs().max() <= 1e-5  # another batch size, same graph
    files = sorted(p.name for p in (cache / "models").iterdir())
    assert len(files) == 2 and not any(f.endswith(".tmp") for f in files)  # one .onnx + its .json, no temp
    meta = export.read_meta(next((cache / "models").glob("*.json")))
    assert meta["verified"][f"{name}/fp32"]["ok"]

    # Second build of the same checkpoint and tile: no export and no re-check against torch.
    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    monkeypatch.setattr("cdmap.backends.runner._torch_reference", no_export)
    again = Predictor.from_checkpoint(ckpt, "cpu", "fp32", backend=name)
    assert torch.equal(again.probability(a, b), prob) or (again.probability(a, b) - prob).abs().max() <= 1e-6
    assert again.backend == name
    assert next(iter(again._runners.values())).cache_hit


def test_export_failure_falls_back_to_torch_with_one_log_line(ckpt, cache, monkeypatch, caplog):
    if not EXPORTED:
        pytest.skip("no exported-graph backend installed")

    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(torch.onnx, "export", broken)
    a, b = _batch()
    pred = Predictor.from_checkpoint(ckpt, "cpu", "fp32", backend=EXPORTED[0])
    with caplog.at_level(logging.WARNING, logger="cdmap"):
        prob = pred.probability(a, b)
        pred.probability(a[:, :, :32, :32], b[:, :, :32, :32])  # another shape: no second attempt, no line
    assert pred.backend == "torch"
    lines = [r for r in caplog.records if r.name == "cdmap"]
    assert len(lines) == 1 and "exporter exploded" in lines[0].getMessage()
    assert (prob - _reference(ckpt, a, b)).abs().max() <= 1e-5


def test_backend_not_installed_falls_back(ckpt, cache, monkeypatch, caplog):
    monkeypatch.setattr(backends, "installed", lambda name: name == "torch")
    a, b = _batch(1)
    pred = Predictor.from_checkpoint(ckpt, "cpu", "fp32", backend="openvino")
    with caplog.at_level(logging.WARNING, logger="cdmap"):
        prob = pred.probability(a, b)
    assert pred.backend == "torch" and len(caplog.records) == 1
    assert "not installed" in caplog.records[0].getMessage()
    assert prob.shape == (1, 64, 64)


def test_onnxruntime_bf16_falls_back_to_torch_bf16(ckpt, cache, caplog):
    if "onnxruntime" not in EXPORTED:
        pytest.skip("onnxruntime not installed")
    a, b = _batch(1)
    pred = Predictor.from_checkpoint(ckpt, "cpu", "bf16", backend="onnxruntime")
    with caplog.at_level(logging.WARNING, logger="cdmap"):
        pred.probability(a, b)
    assert pred.backend == "torch" and pred.precision == "bf16" and len(caplog.records) == 1


def test_live_model_predictor_defaults_to_torch(ckpt):
    pred = Predictor(ckpt.build_model("cpu"), ckpt.mean, ckpt.std, "cpu", "fp32")
    assert pred.backend == "torch"


def test_auto_rule(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(backends, "installed", lambda name: True)
    assert backends.choose("auto", cuda, "bf16") == "torch"
    assert backends.choose("auto", cpu, "fp32") == backends.CPU_FP32_ORDER[0]
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: True)
    assert backends.choose("auto", cpu, "bf16") == "openvino"
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: False)
    assert backends.choose("auto", cpu, "bf16") == "torch"
    monkeypatch.setattr(backends, "installed", lambda name: name in ("torch", "openvino"))
    assert backends.choose("auto", cpu, "fp32") == "openvino"
    monkeypatch.setattr(backends, "installed", lambda name: name == "torch")
    assert backends.choose("auto", cpu, "fp32") == "torch"
    assert backends.choose("onnxruntime", cpu, "fp32") == "onnxruntime"  # explicit: tried, then fallback


def test_unknown_backend_is_a_usage_error():
    from cdmap.errors import UsageError

    with pytest.raises(UsageError):
        backends.validate("tensorrt")


def test_model_hash_follows_weights_and_prefers_checkpoint_sha256(ckpt):
    model = ckpt.build_model("cpu")
    h = export.model_sha256(model, ckpt)
    assert h == export.model_sha256(model, ckpt)
    changed = {k: v.clone() for k, v in ckpt.state_dict.items()}
    key = next(k for k, v in changed.items() if v.is_floating_point())
    changed[key] += 1.0
    other = Checkpoint(ckpt.model_config, changed, ckpt.mean, ckpt.std)
    assert export.model_sha256(model, other) != h

    class WithHash:
        sha256 = "ab" * 32
        state_dict = None

    assert export.model_sha256(model, WithHash()) == export.model_sha256(model, WithHash())
    assert export.cache_key(h, 3, 64, 64) != export.cache_key(h, 3, 64, 128)
    assert export.cache_key(h, 3, 64, 64) != export.cache_key(h, 4, 64, 64)


def test_channels_last_torch_path_is_exact(ckpt):
    """The NHWC layout (CUDA default; Conv3d weights stay 5-D) changes no result on CPU."""
    from cdmap.backends.torch_backend import to_channels_last

    a, b = _batch(1)
    pred = Predictor.from_checkpoint(ckpt, "cpu", "fp32", backend="torch")
    plain = pred.probability(a, b)
    pred.model, pred.channels_last = to_channels_last(pred.model), True
    assert (pred.probability(a, b) - plain).abs().max() <= 1e-5


def test_cuda_batch_size_is_one_on_cpu():
    from cdmap.backends.torch_backend import cuda_batch_size

    assert cuda_batch_size(torch.device("cpu"), 256) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_matches_eager(ckpt, monkeypatch):
    monkeypatch.setenv("CDMAP_CUDA_GRAPHS", "1")
    a, b = _batch(2)
    graphs = Predictor.from_checkpoint(ckpt, "cuda", "fp32", backend="torch")
    assert graphs._graphs is not None
    first = graphs.probability(a, b)
    second = graphs.probability(b, a)  # a replay must not overwrite the first result
    monkeypatch.setenv("CDMAP_CUDA_GRAPHS", "0")
    eager = Predictor.from_checkpoint(ckpt, "cuda", "fp32", backend="torch")
    assert (first - eager.probability(a, b)).abs().max() <= 1e-4
    assert (second - eager.probability(b, a)).abs().max() <= 1e-4


def test_checkpoint_predictor_bf16_on_cpu_uses_chunked_attention_live_model_untouched(ckpt):
    pred = Predictor.from_checkpoint(ckpt, "cpu", "bf16", backend="torch")
    assert {b.attention for b in pred.model.stsam} == {"chunked"}
    assert pred.model.head.block[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    live = ckpt.build_model("cpu")
    Predictor(live, ckpt.mean, ckpt.std, "cpu", "bf16")
    assert {b.attention for b in live.stsam} == {"sdpa"}
    assert live.head.block[0][0].weight.is_contiguous()


def test_auto_keeps_an_exported_backend_only_when_it_measured_faster(ckpt, cache, monkeypatch, caplog):
    from pathlib import Path

    from cdmap.backends import runner

    a, b = _batch(1)
    ref = _reference(ckpt, a, b).numpy()

    class Fake:
        name, precision = "onnxruntime", "fp32"

        def run(self, x, y):
            return ref[: len(x)]

    seen = {}

    def fake_build(name, model, model_hash, bands, h, w, precision, threads, cache=None, torch_forward=None,
                   sample=None):
        seen["torch_forward"] = torch_forward
        return runner.BuiltRunner(Fake(), 0.0, False, 0.0, Path("x.onnx"), speedup=seen["speed"])

    monkeypatch.setattr(runner, "build_runner", fake_build)
    monkeypatch.setattr(backends, "installed", lambda name: True)
    monkeypatch.setattr(backends, "CPU_FP32_ORDER", ("onnxruntime",))
    for speed, runs in ((0.8, "torch"), (1.3, "onnxruntime")):
        seen["speed"] = speed
        pred = Predictor.from_checkpoint(ckpt, "cpu", "fp32", backend="auto")
        with caplog.at_level(logging.INFO, logger="cdmap"):
            prob = pred.probability(a, b)
        assert pred.backend == runs and seen["torch_forward"] is not None
        assert (prob - torch.from_numpy(ref)).abs().max() <= 1e-5
    assert any("0.80x the speed of torch" in r.getMessage() for r in caplog.records)
    seen["speed"] = 0.8
    told = Predictor.from_checkpoint(ckpt, "cpu", "fp32", backend="onnxruntime")
    told.probability(a, b)
    assert told.backend == "onnxruntime" and seen["torch_forward"] is None  # asked for by name: not timed


def test_auto_runs_the_fastest_candidate_not_the_first_faster_one(ckpt, cache, monkeypatch, caplog):
    from pathlib import Path

    from cdmap.backends import runner

    a, b = _batch(1)
    ref = _reference(ckpt, a, b).numpy()
    speeds = {"onnxruntime": 1.2, "openvino": 1.5}
    built = []

    class Fake:
        precision = "fp32"

        def __init__(self, name):
            self.name = name

        def run(self, x, y):
            return ref[: len(x)]

    def fake_build(name, model, model_hash, bands, h, w, precision, threads, cache=None, torch_forward=None,
                   sample=None):
        built.append((name, torch_forward is not None))
        return runner.BuiltRunner(Fake(name), 0.0, False, 0.0, Path("x.onnx"), speedup=speeds[name])

    monkeypatch.setattr(runner, "build_runner", fake_build)
    monkeypatch.setattr(backends, "installed", lambda name: True)
    monkeypatch.setattr(backends, "CPU_FP32_ORDER", ("onnxruntime", "openvino"))
    pred = Predictor.from_checkpoint(ckpt, "cpu", "fp32", backend="auto")
    with caplog.at_level(logging.INFO, logger="cdmap"):
        pred.probability(a, b)
    assert pred.backend == "openvino"
    assert built == [("onnxruntime", True), ("openvino", True)]  # both timed, the fastest kept without a rebuild
    assert any("onnxruntime fp32 1.20x, openvino fp32 1.50x" in r.getMessage() for r in caplog.records)

    # Speeds already in the export cache: nothing is timed again, only the fastest is built.
    monkeypatch.setattr(runner, "cached_speedup", lambda name, *args, **kwargs: {"onnxruntime": 1.4,
                                                                                  "openvino": 1.1}[name])
    built.clear()
    again = Predictor.from_checkpoint(ckpt, "cpu", "fp32", backend="auto")
    again.probability(a, b)
    assert again.backend == "onnxruntime" and built == [("onnxruntime", False)]


def test_measure_speedup_is_torch_time_over_backend_time():
    import time

    from cdmap.backends.runner import measure_speedup

    class Sleepy:
        def __init__(self, s):
            self.s = s

        def run(self, a, b):
            time.sleep(self.s)

    torch_forward = Sleepy(0.02).run
    assert 1.5 < measure_speedup(Sleepy(0.01), torch_forward, None, None) < 2.5
    assert 0.35 < measure_speedup(Sleepy(0.04), torch_forward, None, None) < 0.65


@pytest.mark.parametrize("name", EXPORTED)
def test_auto_measures_speed_once_per_thread_count_and_caches_it(ckpt, cache, name, monkeypatch):
    from cdmap.backends import runner

    monkeypatch.setattr(backends, "CPU_FP32_ORDER", (name,))
    a, b = _batch(1)
    Predictor.from_checkpoint(ckpt, "cpu", "fp32", backend="auto").probability(a, b)
    meta = export.read_meta(next((cache / "models").glob("*.json")))
    speed = meta["verified"][f"{name}/fp32"]["speedup"][str(torch.get_num_threads())]
    assert speed > 0

    def timed_again(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(runner, "measure_speedup", timed_again)
    again = Predictor.from_checkpoint(ckpt, "cpu", "fp32", backend="auto")
    again.probability(a, b)
    assert again.backend == (name if speed >= 1.0 else "torch")


def _fake_compile(monkeypatch, wrap):
    monkeypatch.setattr(backends, "installed", lambda name: True)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: wrap(model))


def test_compile_backend_checks_its_first_batch_and_pads_a_smaller_last_one(ckpt, monkeypatch):
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, a, b):
            calls.append(a.shape[0])
            return self.model(a, b)

    _fake_compile(monkeypatch, Counting)
    a, b = _batch(3)
    pred = Predictor.from_checkpoint(ckpt, "cpu", "fp32", backend="compile")
    assert pred.backend == "compile" and not pred.channels_last
    full = pred.probability(a, b)
    assert (full - _reference(ckpt, a, b)).abs().max() <= 1e-5
    last = pred.probability(a[:1], b[:1])  # run at the compiled batch size, not compiled again
    assert calls == [3, 3] and last.shape == (1, 64, 64)
    assert (last - full[:1]).abs().max() <= 1e-5
    assert pred.describe()["backend"] == "compile" and pred.setup_s > 0


def test_compile_backend_falls_back_to_torch_on_failure_or_difference(ckpt, monkeypatch, caplog):
    class Broken(torch.nn.Module):
        def forward(self, a, b):
            raise RuntimeError("no C++ compiler worked")

    class Off(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, a, b):
            return self.model(a, b) + torch.tensor([0.0, 0.5]).view(1, 2, 1, 1)

    a, b = _batch(1)
    for wrap, says in ((lambda m: Broken(), "no C++ compiler worked"), (Off, "differs from eager torch")):
        _fake_compile(monkeypatch, wrap)
        caplog.clear()
        pred = Predictor.from_checkpoint(ckpt, "cpu", "fp32", backend="compile")
        with caplog.at_level(logging.WARNING, logger="cdmap"):
            prob = pred.probability(a, b)
            pred.probability(a, b)
        assert pred.backend == "torch" and (prob - _reference(ckpt, a, b)).abs().max() <= 1e-5
        lines = [r.getMessage() for r in caplog.records if r.name == "cdmap"]
        assert len(lines) == 1 and says in lines[0]


def test_compile_backend_without_a_compiler_falls_back(ckpt, monkeypatch, caplog):
    monkeypatch.setattr(backends, "installed", lambda name: name == "torch")
    with caplog.at_level(logging.WARNING, logger="cdmap"):
        pred = Predictor.from_checkpoint(ckpt, "cpu", "fp32", backend="compile")
    assert pred.backend == "torch" and "C++ compiler" in caplog.records[0].getMessage()


@pytest.mark.slow
@pytest.mark.skipif(not backends.installed("compile"), reason="no C++ compiler for inductor")
def test_real_torch_compile_is_fp32_equivalent(ckpt):
    a, b = _batch(2)
    pred = Predictor.from_checkpoint(ckpt, "cpu", "fp32", backend="compile")
    prob = pred.probability(a, b)
    assert pred.backend == "compile"
    assert (prob - _reference(ckpt, a, b)).abs().max() <= 1e-4
