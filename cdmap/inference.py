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

AUTO_MIN_SPEEDUP = 1.0
"""``auto`` keeps an exported-graph backend only when it measured at least this fast against torch here (once
per checkpoint, shape, backend, precision and thread count; kept in the export cache)."""


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
    """A network, its normalisation, a device, a precision and a backend: ``prepare`` then ``probability``.

    Build it from a checkpoint with :meth:`from_checkpoint` (backend ``auto`` by default), or around a network
    being trained (validation: always plain torch on the live model).

    ``backend`` is one of :data:`cdmap.backends.BACKENDS`. ``onnxruntime`` and ``openvino`` run the network
    exported to ONNX (cached per checkpoint, band count and tile shape, built on the first batch of each shape)
    on the CPU; ``compile`` runs it through ``torch.compile``. If a backend cannot be used (not installed,
    export or compile fails, precision not supported, result not fp32-equivalent) the predictor logs one line
    and runs torch. :attr:`backend` names what runs now.
    """

    def __init__(self, model: torch.nn.Module, mean: Sequence[float], std: Sequence[float],
                 device: Any = "auto", precision: str = "auto", backend: str = "torch",
                 model_hash: str | None = None, owns_model: bool = False) -> None:
        import torch

        from cdmap.backends import candidates
        from cdmap.backends.torch_backend import (
            CudaGraphForward,
            cuda_graphs_enabled,
            prepare_model,
            use_channels_last,
        )
        from cdmap.device import autocast_dtype, resolve_device, resolve_precision

        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.normalisation = Normalisation.of(mean, std)
        self._dtype = autocast_dtype(self.precision)
        self._cuda = self.device.type == "cuda"
        self.source: Any = None  # the checkpoint file, named when the network misbehaves
        self.requested_backend = backend
        self._candidates = candidates(backend, self.device, self.precision)
        self.backend = self._candidates.pop(0)
        # inductor with freezing picks its own layouts; NHWC weights and inputs made the compiled model no
        # faster on CPU (benchmarks/RESULTS.md section 6), so it stays NCHW
        compiled_cpu = self.backend == "compile" and not self._cuda
        self.channels_last = use_channels_last(self.device, owned=owns_model) and not compiled_cpu
        self.model = prepare_model(model, self.device, self.channels_last, self.precision, owned=owns_model)
        self._graphs = (CudaGraphForward(self.model, self.device, self._dtype, self.channels_last)
                        if owns_model and cuda_graphs_enabled(self.device) else None)
        self._model_hash = model_hash
        self._runners: dict[tuple[int, ...], Any] = {}
        self.setup_s = 0.0  # export/compile time spent by non-torch backends so far
        self._compiled: Any = None
        self._compiled_batch: dict[tuple[int, ...], int] = {}  # (C, H, W) -> the batch size compiled for it
        if self.backend == "compile":
            self._start_compile(owns_model)
        elif self.backend != "torch" and self._cuda:
            self._fall_back(f"{self.backend} runs on the CPU only here and the device is {self.device}")

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, device: Any = "auto", precision: str = "auto",
                        backend: str = "auto") -> Predictor:
        """The checkpoint's network in eval mode on ``device`` with the checkpoint's normalisation.

        ``backend``: ``auto`` (the fastest installed fp32-equivalent backend on this device), ``torch``,
        ``onnxruntime`` or ``openvino``.
        """
        from cdmap.backends import validate
        from cdmap.device import resolve_device

        backend = validate(backend)
        dev = resolve_device(device) if isinstance(device, str) or device is None else device
        model = ckpt.build_model(str(dev))
        model_hash = None
        if backend != "torch":
            from cdmap.backends.export import model_sha256

            model_hash = model_sha256(model, ckpt)
        predictor = cls(model, ckpt.mean, ckpt.std, dev, precision, backend=backend, model_hash=model_hash,
                        owns_model=True)
        predictor.source = ckpt.source
        return predictor

    def _start_compile(self, owned: bool) -> None:
        from cdmap.backends import installed
        from cdmap.backends.torch_backend import CompiledForward

        if not owned:
            self._fall_back("only a checkpoint's network is compiled, not a model being trained")
        elif not installed("compile") and not self._cuda:
            self._fall_back("torch.compile needs a C++ compiler (g++ or clang++) on the PATH")
        else:
            try:
                self._compiled = CompiledForward(self.model, self.device, self._dtype)
            except Exception as exc:  # noqa: BLE001 - any failure means: run torch
                self._fall_back(_one_line(exc))

    def _compiled_probability(self, xa: Any, xb: Any) -> Any:
        """P(change) through the compiled forward; the first batch of a shape compiles it and is checked
        against eager torch (any failure or difference: torch from then on, with one log line)."""
        import time

        import torch

        from cdmap.backends.runner import BF16_TOLERANCE, EXACT_TOLERANCE
        from cdmap.backends.torch_backend import forward_probability

        key, n = tuple(xa.shape[1:]), xa.shape[0]
        compiled_n = self._compiled_batch.get(key)
        if compiled_n is not None and n <= compiled_n:
            if n == compiled_n:
                return self._compiled(xa, xb)
            # a last, smaller batch: padded with zeros to the compiled size instead of compiling again (each
            # image of a batch is computed on its own in eval mode)
            pad = (compiled_n - n, *xa.shape[1:])
            za, zb = (torch.cat((x, x.new_zeros(pad))) for x in (xa, xb))
            return self._compiled(za, zb)[:n]
        t = time.perf_counter()
        try:
            got = self._compiled(xa, xb)
        except Exception as exc:  # noqa: BLE001 - a compiler error, a missing toolchain...
            self._fall_back(_one_line(exc))
            return None
        self.setup_s += time.perf_counter() - t
        ref = forward_probability(self.model, xa, xb, self.device, self._dtype)
        diff = float((got.float() - ref.float()).abs().max())
        tolerance = EXACT_TOLERANCE if self._dtype is None else BF16_TOLERANCE
        if not diff <= tolerance:
            self._fall_back(f"the compiled forward differs from eager torch by {diff:.3g} in P(change)")
            return ref
        self._compiled_batch[key] = n
        return got

    def _fall_back(self, reason: str) -> None:
        import logging

        logging.getLogger("cdmap").warning("backend %s not used (%s); running torch %s",
                                           self.backend, reason, self.precision)
        self.backend = "torch"
        self._runners.clear()
        self._compiled = None

    def _runner(self, shape: tuple[int, ...], sample: tuple[np.ndarray, np.ndarray] | None = None) -> Any:
        """The exported-graph runner for inputs of ``shape`` (N, C, H, W), or None for torch; ``auto`` picks
        the fastest of its candidates, timed against torch on ``sample`` (the batch at hand)."""
        if self.backend == "torch":
            return None
        key = tuple(shape[1:])
        if key not in self._runners:
            if self._model_hash is None:
                from cdmap.backends.export import model_sha256

                self._model_hash = model_sha256(self.model)
            if self.requested_backend == "auto":
                built = self._fastest(key, sample)
            else:
                try:
                    built = self._build(self.backend, key)
                except Exception as exc:  # noqa: BLE001 - any failure means: run torch
                    self._fall_back(_one_line(exc))
                    built = None
            if built is None:
                return None
            self._runners[key] = built
        return self._runners[key].runner

    def _build(self, name: str, key: tuple[int, ...], sample: tuple[np.ndarray, np.ndarray] | None = None,
               timed: bool = False) -> Any:
        import torch

        from cdmap.backends.runner import build_runner

        built = build_runner(name, self.model, self._model_hash, key[0], key[1], key[2], self.precision,
                             torch.get_num_threads(), torch_forward=self._torch_probability if timed else None,
                             sample=sample)
        self.setup_s += built.setup_s
        return built

    def _fastest(self, key: tuple[int, ...], sample: tuple[np.ndarray, np.ndarray] | None) -> Any:
        """``auto``: every candidate's speed against torch (measured once per checkpoint, shape and thread
        count, then read from the export cache), and the runner of the fastest one if it beats torch."""
        import logging

        import torch

        from cdmap.backends.runner import cached_speedup

        log = logging.getLogger("cdmap")
        names = [self.backend, *(c for c in self._candidates if c != "torch")]
        speeds: dict[str, float] = {}
        best: tuple[str, Any] | None = None  # only the fastest runner built so far is kept (each holds a graph)
        for name in names:
            known = cached_speedup(name, self._model_hash, key, self.precision, torch.get_num_threads())
            if known is not None:
                speeds[name] = known
                continue
            try:
                built = self._build(name, key, sample, timed=True)
            except Exception as exc:  # noqa: BLE001 - a backend that cannot run is not a candidate
                log.warning("backend %s not used (%s)", name, _one_line(exc))
                continue
            if built.speedup is not None:
                speeds[name] = built.speedup
                if best is None or built.speedup > speeds[best[0]]:
                    best = (name, built)
        chosen = max(speeds, key=speeds.__getitem__) if speeds else "torch"
        if chosen != "torch" and speeds[chosen] < AUTO_MIN_SPEEDUP:
            chosen = "torch"
        figures = ", ".join(f"{n} {self.precision} {v:.2f}x" for n, v in speeds.items())
        if figures:
            log.info("backend auto: %s the speed of torch here; running %s", figures, chosen)
        self.backend = chosen
        self._candidates = []
        if chosen == "torch":
            self._runners.clear()
            return None
        if best is not None and best[0] == chosen:
            return best[1]
        try:
            return self._build(chosen, key)
        except Exception as exc:  # noqa: BLE001 - any failure means: run torch
            self._fall_back(_one_line(exc))
            return None

    def prepare(self, a: np.ndarray, b: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Normalise both dates ``(C, H, W)`` and zero the pixels that are not valid in both."""
        n = self.normalisation
        return n.apply(a, valid), n.apply(b, valid)

    def probability(self, a: Any, b: Any) -> torch.Tensor:
        """P(change) ``(N, H, W)`` float32 on the device for prepared batches (numpy or tensors, 3-D or 4-D)."""
        import torch

        from cdmap.backends import EXPORTED

        if self.backend in EXPORTED:
            xa, xb = _host_batch(a), _host_batch(b)
            runner = self._runner(xa.shape, (xa, xb))
            if runner is not None:
                if xa.shape != xb.shape:
                    raise ValueError(f"the two dates must have the same shape, got {xa.shape} and {xb.shape}")
                return torch.from_numpy(runner.run(xa, xb))
        return self._torch_probability(a, b)

    def _torch_probability(self, a: Any, b: Any) -> torch.Tensor:
        from cdmap.backends.torch_backend import forward_probability, to_device

        xa, xb = to_device(a, self.device, self.channels_last), to_device(b, self.device, self.channels_last)
        if self._compiled is not None:
            out = self._compiled_probability(xa, xb)
            if out is not None:
                return out
        if self._graphs is not None:
            return self._graphs(xa, xb).clone()  # the graph output buffer is reused by the next replay
        return forward_probability(self.model, xa, xb, self.device, self._dtype)

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

    def suggested_batch_size(self, tile: int) -> int | None:
        """On CUDA, a batch size whose forward fits the free device memory; None on CPU (keep the user's)."""
        if not self._cuda:
            return None
        from cdmap.backends.torch_backend import cuda_batch_size

        return cuda_batch_size(self.device, tile, self.precision)

    def describe(self) -> dict[str, Any]:
        """What runs: backend, precision, device and the setup (export/compile) seconds spent."""
        return {"backend": self.backend, "requested_backend": self.requested_backend,
                "precision": self.precision, "device": str(self.device), "setup_s": round(self.setup_s, 3)}

    def peak_memory_mib(self) -> float | None:
        """Peak device memory allocated so far (CUDA only)."""
        if not self._cuda:
            return None
        import torch

        return torch.cuda.max_memory_allocated(self.device) / 2**20


def _host_batch(x: Any) -> np.ndarray:
    """A C-contiguous float32 ``(N, C, H, W)`` numpy array from numpy or a (CPU) tensor, 3-D or 4-D."""
    if not isinstance(x, np.ndarray):
        x = x.detach().cpu().numpy()
    if x.ndim == 3:
        x = x[None]
    return np.ascontiguousarray(x, dtype=np.float32)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
