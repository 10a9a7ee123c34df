"""The one place that normalises inputs and runs FSG-Net's forward pass for P(change).

Predict (scene windows), evaluate (labelled tiles) and training validation all go through a
:class:`Predictor`; nothing else normalises images or calls the network for probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from cdmap.checkpoint import Checkpoint


@dataclass(frozen=True)
class Normalisation:
    """Per-band mean/std applied identically to both dates; invalid pixels become 0 (the band mean)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, mean: Sequence[float], std: Sequence[float]) -> Normalisation:
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def apply(self, x: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
        """Normalise one image ``(C, H, W)``; pixels where ``valid`` is False are set to 0. Returns float32."""
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        out = (np.asarray(x, dtype=np.float32) - mean) / std
        if valid is not None and not valid.all():
            out[:, ~valid] = 0.0
        return np.ascontiguousarray(out, dtype=np.float32)


class PendingProbability:
    """P(change) of a launched batch; on CUDA the copy to host runs asynchronously until :meth:`numpy`."""

    def __init__(self, prob: torch.Tensor, event: Any = None, source: Any = None) -> None:
        self._prob = prob
        self._event = event
        self._source = source

    def numpy(self) -> np.ndarray:
        """``(N, H, W)`` float32 on the host (waits for the device); a non-finite value is refused."""
        if self._event is not None:
            self._event.synchronize()
        out = self._prob.numpy()
        check_finite_output(out, self._source)
        return out


def check_finite_output(prob: np.ndarray, source: Any) -> None:
    """Raise :class:`CheckpointError` (exit 5) naming the checkpoint when the network gave NaN or infinity: such
    a model would otherwise turn every pixel into nodata and report success."""
    if not np.isfinite(prob).all():
        from cdmap.errors import CheckpointError

        raise CheckpointError("the model produces non-finite outputs (NaN or infinity) on this input; the "
                              "checkpoint is unusable", source if source is not None else "model")


class Predictor:
    """A network, its normalisation, a device and a precision: ``prepare`` then ``probability``.

    Build it from a checkpoint with :meth:`from_checkpoint`, or around a network being trained (validation).
    """

    def __init__(self, model: torch.nn.Module, mean: Sequence[float], std: Sequence[float],
                 device: Any = "auto", precision: str = "auto") -> None:
        import torch

        from cdmap.device import autocast_dtype, resolve_device, resolve_precision

        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.normalisation = Normalisation.of(mean, std)
        self._dtype = autocast_dtype(self.precision)
        self._cuda = self.device.type == "cuda"
        self.model = model
        self.source: Any = None  # the checkpoint file, named when the network misbehaves
        if self._cuda:
            self.model = model.to(memory_format=torch.channels_last)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, device: Any = "auto", precision: str = "auto") -> Predictor:
        """The checkpoint's network in eval mode on ``device`` with the checkpoint's normalisation."""
        from cdmap.device import resolve_device

        dev = resolve_device(device) if isinstance(device, str) or device is None else device
        predictor = cls(ckpt.build_model(str(dev)), ckpt.mean, ckpt.std, dev, precision)
        predictor.source = ckpt.source
        return predictor

    def prepare(self, a: np.ndarray, b: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Normalise both dates ``(C, H, W)`` and zero the pixels that are not valid in both."""
        n = self.normalisation
        return n.apply(a, valid), n.apply(b, valid)

    def _to_device(self, x: Any) -> torch.Tensor:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
        if t.dim() == 3:
            t = t[None]
        if self._cuda:
            if t.device.type == "cpu":
                t = t.pin_memory()
            t = t.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        elif t.device != self.device:
            t = t.to(self.device)
        return t

    def probability(self, a: Any, b: Any) -> torch.Tensor:
        """P(change) ``(N, H, W)`` float32 on the device for prepared batches (numpy or tensors, 3-D or 4-D)."""
        import torch

        xa, xb = self._to_device(a), self._to_device(b)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=self._dtype or torch.float32,
                                                        enabled=self._dtype is not None):
                logits = self.model(xa, xb)
            return torch.softmax(logits.float(), dim=1)[:, 1]
        finally:
            self.model.train(was_training)

    def launch(self, a: np.ndarray, b: np.ndarray) -> PendingProbability:
        """Start :meth:`probability` on a batch; on CUDA the result is copied to pinned host memory without
        blocking, so the caller can prepare the next batch meanwhile."""
        import torch

        prob = self.probability(a, b)
        if not self._cuda:
            return PendingProbability(prob, source=self.source)
        out = torch.empty(prob.shape, dtype=torch.float32, pin_memory=True)
        out.copy_(prob, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingProbability(out, event, self.source)

    def peak_memory_mib(self) -> float | None:
        """Peak device memory allocated so far (CUDA only)."""
        if not self._cuda:
            return None
        import torch

        return torch.cuda.max_memory_allocated(self.device) / 2**20
