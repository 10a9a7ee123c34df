"""The checkpoint format: round trip, provenance, and every refusal."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch

from cdmap.checkpoint import FORMAT_VERSION, Checkpoint, file_sha256, load_checkpoint, save_checkpoint
from cdmap.errors import CheckpointError
from cdmap.models import FSGNet, ModelConfig


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = ModelConfig(in_channels=4)
    model = FSGNet(cfg)
    ckpt = Checkpoint(cfg, model.state_dict(), [1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], tile_size=128,
                      threshold=0.42, metrics={"val_f1": 0.8},
                      training_state={"epoch": 3, "rng": torch.get_rng_state(), "history": [{"loss": 1.0}]})
    return save_checkpoint(ckpt, tmp_path_factory.mktemp("ck") / "m.pt"), model


def test_round_trip_keeps_everything(saved):
    path, model = saved
    ck = load_checkpoint(path)
    assert ck.model_config == ModelConfig(in_channels=4)
    assert ck.mean == [1.0, 2.0, 3.0, 4.0] and ck.std == [5.0, 6.0, 7.0, 8.0]
    assert ck.tile_size == 128 and ck.threshold == pytest.approx(0.42) and ck.metrics == {"val_f1": 0.8}
    assert ck.provenance["cdmap_version"] and ck.provenance["torch_version"] and ck.provenance["created"]
    assert ck.training_state["epoch"] == 3
    rebuilt = ck.build_model()
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)
    s = ck.summary()
    assert s["format_version"] == FORMAT_VERSION and s["parameters"] > 5_000_000 and s["has_training_state"]
    assert len(file_sha256(path)) == 64


def test_normalisation_must_match_bands():
    with pytest.raises(ValueError):
        Checkpoint(ModelConfig(), {}, [0.0], [1.0])
    with pytest.raises(ValueError):
        Checkpoint(ModelConfig(), {}, [0.0] * 3, [1.0, 0.0, 1.0])


def test_refuses_what_is_not_a_checkpoint(tmp_path, saved):
    path, _ = saved
    cases = {}
    cases["missing"] = tmp_path / "nope.pt"
    cases["directory"] = tmp_path
    (tmp_path / "text.pt").write_text("hello")
    cases["text"] = tmp_path / "text.pt"
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    cases["truncated"] = tmp_path / "trunc.pt"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.txt", "not torch")
    (tmp_path / "zip.pt").write_bytes(buf.getvalue())
    cases["zip"] = tmp_path / "zip.pt"
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    cases["plain torch file"] = tmp_path / "plain.pt"
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, tmp_path / "newer.pt")
    cases["newer"] = tmp_path / "newer.pt"
    torch.save({"format": "cdmap-checkpoint", "evil": zipfile.ZipInfo("x")}, tmp_path / "pickle.pt")
    cases["pickle"] = tmp_path / "pickle.pt"
    messages = {}
    for name, p in cases.items():
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(p)
        msg = str(err.value)
        assert "\n" not in msg and str(p) in msg, (name, msg)
        messages[name] = msg
    assert "newer cdmap" in messages["newer"]
    assert "pickled" in messages["pickle"]
    assert "truncated" in messages["truncated"]
    assert "not a cdmap checkpoint" in messages["plain torch file"]


def test_sha256_is_the_file_hash_once_loaded_or_saved(saved, tmp_path):
    path, _ = saved
    ck = load_checkpoint(path)
    assert ck.source == path and ck.sha256 == file_sha256(path)
    again = save_checkpoint(ck, tmp_path / "again.pt")
    assert ck.source == again and ck.sha256 == file_sha256(again)


def test_in_memory_checkpoint_hashes_its_tensors_once():
    from cdmap.checkpoint import tensor_sha256
    from cdmap.models import FSGNet

    model = FSGNet(ModelConfig())
    ck = Checkpoint(ModelConfig(), model.state_dict(), [0.0] * 3, [1.0] * 3)
    assert ck.source is None and ck.sha256 == tensor_sha256(ck.state_dict) and len(ck.sha256) == 64
    other = Checkpoint(ModelConfig(), {k: v + 1 for k, v in model.state_dict().items()}, [0.0] * 3, [1.0] * 3)
    assert other.sha256 != ck.sha256


def test_a_modified_copy_has_no_file(saved):
    import dataclasses

    from cdmap.checkpoint import tensor_sha256

    ck = load_checkpoint(saved[0])
    copy = dataclasses.replace(ck, threshold=0.1)
    assert copy.source is None and copy.sha256 == tensor_sha256(ck.state_dict) != ck.sha256
