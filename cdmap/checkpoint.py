"""The cdmap checkpoint: one file format, data only, loaded with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain containers (str, int, float, bool, list, dict, None)::

    format            "cdmap-checkpoint"
    format_version    int, FORMAT_VERSION when written
    model_config      ModelConfig.to_dict()
    state_dict        {name: tensor}
    normalization     {"mean": [float per band], "std": [float per band]}: x_norm = (x - mean) / std
    tile_size         int, the training crop size (predict's default window)
    threshold         float, decision threshold on P(change)
    metrics           {name: float}, e.g. validation F1 of the best epoch
    provenance        {"cdmap_version", "torch_version", "created", ...}
    training_state    optional dict for exact resume (optimiser, scheduler, RNG, ...), plain containers only
    card              optional model card {name, bands, gsd_m, training_data, licence, held_out, ...}
                      (packaged models, :mod:`cdmap.weights`)

Weights may be stored in half precision (:func:`with_half_weights`, packaged models); they are loaded into
the fp32 model as usual.
    overlap           optional int, the window overlap measured for this model (:mod:`cdmap.calibrate`)
    blend_margin      optional int, pixels discarded at each window edge, measured with ``overlap``
    seam_calibration  optional dict, the measurement behind them (edge profile, seam ratio per candidate)

Anything else (a pickled object, a truncated file, a newer format) is refused with a :class:`CheckpointError`.

A :class:`Checkpoint` knows where it came from: ``source`` is the file it was loaded from or saved to (None
for one only ever in memory) and ``sha256`` is that file's SHA-256, set by :func:`load_checkpoint` and
:func:`save_checkpoint`. A checkpoint with no file hashes its tensors instead (:func:`tensor_sha256`), once,
the first time ``sha256`` is read.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdmap._version import __version__
from cdmap.errors import CheckpointError, OutputError
from cdmap.models.config import ModelConfig

FORMAT = "cdmap-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """An FSG-Net's weights with everything needed to use them correctly."""

    model_config: ModelConfig
    state_dict: dict[str, Any]
    mean: list[float]
    std: list[float]
    tile_size: int = 256
    threshold: float = 0.5
    metrics: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    training_state: dict[str, Any] | None = None
    card: dict[str, Any] = field(default_factory=dict)
    overlap: int | None = None
    blend_margin: int | None = None
    seam_calibration: dict[str, Any] | None = None
    # set only by load_checkpoint/save_checkpoint (a dataclasses.replace() copy has no file: both reset)
    source: Path | None = field(default=None, init=False, compare=False)
    _sha256: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        bands = self.model_config.in_channels
        if len(self.mean) != bands or len(self.std) != bands:
            raise ValueError(f"normalization needs {bands} mean/std values, got {len(self.mean)}/{len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError("normalization std values must be > 0")

    @property
    def in_channels(self) -> int:
        return self.model_config.in_channels

    @property
    def sha256(self) -> str:
        """SHA-256 of the checkpoint file (``source``); without a file, :func:`tensor_sha256` of the weights,
        computed once (later changes to ``state_dict`` are not seen)."""
        if self._sha256 is None:
            self._sha256 = tensor_sha256(self.state_dict)
        return self._sha256

    def _set_file(self, path: Path, sha256: str) -> None:
        self.source = path
        self._sha256 = sha256

    def to_payload(self) -> dict[str, Any]:
        import torch

        prov = {
            "cdmap_version": __version__,
            "torch_version": torch.__version__.split("+")[0],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        prov.update(self.provenance)
        payload: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_config": self.model_config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
            "normalization": {"mean": [float(m) for m in self.mean], "std": [float(s) for s in self.std]},
            "tile_size": int(self.tile_size),
            "threshold": float(self.threshold),
            "metrics": {k: float(v) for k, v in self.metrics.items()},
            "provenance": prov,
        }
        if self.training_state is not None:
            payload["training_state"] = self.training_state
        if self.card:
            payload["card"] = self.card
        for name in ("overlap", "blend_margin", "seam_calibration"):
            if getattr(self, name) is not None:
                payload[name] = getattr(self, name)
        return payload

    def build_model(self, device: str | None = None):
        """Return the FSG-Net with these weights, in eval mode."""
        from cdmap.models import FSGNet

        model = FSGNet(self.model_config)
        model.load_state_dict(self.state_dict)
        model.eval()
        if device is not None:
            model.to(device)
        return model

    def summary(self) -> dict[str, Any]:
        """Plain-data description (what ``cdmap info`` prints)."""
        n_params = sum(int(v.numel()) for k, v in self.state_dict.items() if _is_parameter_key(k))
        return {
            "format_version": FORMAT_VERSION,
            "model_config": self.model_config.to_dict(),
            "parameters": n_params,
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "tile_size": self.tile_size,
            "threshold": self.threshold,
            "metrics": dict(self.metrics),
            "provenance": dict(self.provenance),
            "has_training_state": self.training_state is not None,
            "card": dict(self.card),
            "overlap": self.overlap,
            "blend_margin": self.blend_margin,
            "seam_calibration": self.seam_calibration,
        }


def with_half_weights(ckpt: Checkpoint) -> Checkpoint:
    """A copy whose floating-point weights are stored as float16 (half the file size; loaded into fp32 as
    usual). Integer buffers (BatchNorm counters) stay as they are."""
    import dataclasses

    import torch

    state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in ckpt.state_dict.items()}
    return dataclasses.replace(ckpt, state_dict=state)


def _is_parameter_key(key: str) -> bool:
    return not key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> Path:
    """Write ``ckpt`` atomically (temporary name, then rename) and return the path."""
    import torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt.to_payload(), tmp)
        digest = file_sha256(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write checkpoint: {exc.strerror or exc}", path) from exc
    finally:
        tmp.unlink(missing_ok=True)  # written and renamed, or failed / interrupted: never left behind
    ckpt._set_file(path, digest)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> Checkpoint:
    """Load a cdmap checkpoint, refusing anything that is not one (one-line :class:`CheckpointError`)."""
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError("checkpoint not found", path)
    if path.is_dir():
        raise CheckpointError("is a directory, not a checkpoint file", path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint: {exc.strerror or exc}", path) from exc
    if not data.startswith(b"PK"):
        raise CheckpointError("not a cdmap checkpoint (not a PyTorch zip archive)", path)
    if not _zip_complete(data):
        raise CheckpointError("checkpoint is truncated or corrupt (incomplete zip archive)", path)
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            "refusing to load: the file carries pickled Python objects (possible code), not plain data", path
        ) from exc
    except Exception as exc:  # torch raises RuntimeError/EOFError/etc. for damaged archives
        raise CheckpointError(f"checkpoint is truncated or corrupt ({type(exc).__name__})", path) from exc
    ckpt = _from_payload(payload, path)
    ckpt._set_file(path, hashlib.sha256(data).hexdigest())
    return ckpt


def _zip_complete(data: bytes) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return zf.testzip() is None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError):
        return False


def _from_payload(payload: Any, path: Path) -> Checkpoint:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError("not a cdmap checkpoint (no cdmap format marker)", path)
    version = payload.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError("not a cdmap checkpoint (format version missing)", path)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"written by a newer cdmap (format {version}, this cdmap reads up to {FORMAT_VERSION}); upgrade cdmap",
            path,
        )
    _check_field_types(payload, path)
    try:
        norm = payload["normalization"]
        ckpt = Checkpoint(
            model_config=ModelConfig.from_dict(payload["model_config"]),
            state_dict=payload["state_dict"],
            mean=[float(m) for m in norm["mean"]],
            std=[float(s) for s in norm["std"]],
            tile_size=int(payload["tile_size"]),
            threshold=float(payload["threshold"]),
            metrics=dict(payload.get("metrics", {})),
            provenance=dict(payload.get("provenance", {})),
            training_state=payload.get("training_state"),
            card=dict(payload.get("card") or {}),
            overlap=payload.get("overlap"),
            blend_margin=payload.get("blend_margin"),
            seam_calibration=payload.get("seam_calibration"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"cdmap checkpoint is missing or has a bad field ({exc})", path) from exc
    _check_weights(ckpt, path)
    return ckpt


_FIELD_TYPES: dict[str, tuple[type, ...]] = {"model_config": (dict,), "state_dict": (dict,), "normalization": (dict,),
                                             "card": (dict,),
                                             "tile_size": (int,), "threshold": (float, int), "overlap": (int,),
                                             "blend_margin": (int,), "seam_calibration": (dict,)}
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {"backbone": (str,), "in_channels": (int,), "num_classes": (int,),
                                              "dropblock_size": (int,), "dropblock_prob": (float, int),
                                              "attention": (str,)}


def _check_field_types(payload: dict[str, Any], path: Path) -> None:
    """Every field of the right type and in range (a bool is not a number here; no NaN threshold or std)."""
    import math

    def bad(name: str, value: Any, types: tuple[type, ...]) -> bool:
        return isinstance(value, bool) or not isinstance(value, types)

    for name, types in _FIELD_TYPES.items():
        if name in payload and bad(name, payload[name], types):
            raise CheckpointError(f"field {name!r} has the wrong type ({type(payload[name]).__name__})", path)
    for name, types in _CONFIG_TYPES.items():
        value = payload.get("model_config", {}).get(name)
        if value is not None and bad(name, value, types):
            raise CheckpointError(f"model_config field {name!r} has the wrong type ({type(value).__name__})", path)
    norm = payload.get("normalization", {})
    for key in ("mean", "std"):
        values = norm.get(key)
        if not isinstance(values, list) or any(bad(key, v, (float, int)) or not math.isfinite(v) for v in values):
            raise CheckpointError(f"normalization {key!r} must be a list of finite numbers", path)
    thr, tile = payload.get("threshold"), payload.get("tile_size")
    if isinstance(thr, (int, float)) and not 0.0 <= thr <= 1.0:
        raise CheckpointError(f"threshold {thr} is not between 0 and 1", path)
    if isinstance(tile, int) and tile < 1:
        raise CheckpointError(f"tile_size {tile} is not a positive number of pixels", path)
    overlap, margin = payload.get("overlap"), payload.get("blend_margin")
    if overlap is not None and (overlap < 0 or (isinstance(tile, int) and overlap >= tile)):
        raise CheckpointError(f"overlap {overlap} is not between 0 and the tile size", path)
    if margin is not None and (overlap is None or margin < 0 or 2 * margin > overlap):
        raise CheckpointError(f"blend_margin {margin} is not between 0 and half the overlap", path)


def _check_weights(ckpt: Checkpoint, path: Path) -> None:
    """The state dict matches the network its config describes (names, shapes) and holds finite numbers only.

    The network is built on the CPU to read its shapes (30-130 ms, freed at once). Not on torch's ``meta``
    device: the first meta build in a process runs the weight initialisers through torch's Python reference
    implementations, about 1 s of every ``cdmap predict``.
    """
    import torch

    from cdmap.models import FSGNet

    expected = {k: tuple(v.shape) for k, v in FSGNet(ckpt.model_config).state_dict().items()}
    sd = ckpt.state_dict
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise CheckpointError(f"weights do not match the {ckpt.model_config.backbone} network of its config "
                              f"({len(missing)} missing, {len(extra)} unexpected tensors; {what})", path)
    for name, shape in expected.items():
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"weight {name!r} is not a tensor ({type(t).__name__})", path)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"weight {name!r} has shape {tuple(t.shape)}, the network needs {shape}", path)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"weight {name!r} holds non-finite values (NaN or infinity)", path)


def tensor_sha256(state_dict: dict[str, Any]) -> str:
    """Hex SHA-256 of a state dict's content: for each key in sorted order, the key (UTF-8) then the raw
    bytes of its tensor (CPU, contiguous, any dtype). Used for checkpoints that were never a file."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (recorded as the checkpoint hash in outputs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
