"""The torch path (the reference, and the only one on CUDA): eval model, inference_mode, autocast.

CPU: fp32 by default, Conv2d weights and inputs in channels_last for a network the predictor owns (a
checkpoint's; 1.10x here), STSAM on its fused SDPA kernel: the unpadded ``chunked`` attention is exact too
but measured no faster in eager torch on this CPU (its C/8-wide Q.K product is memory-bound), so it is used in
the exported graphs only (benchmarks/RESULTS.md section 5). bf16 autocast when asked for.

CUDA: channels_last, bf16/fp16 autocast, pinned non-blocking host-to-device copies (the caller reads the next
batch meanwhile), a batch size that fits the free memory (:func:`cuda_batch_size`) and, opt-in with
``CDMAP_CUDA_GRAPHS=1``, CUDA-graph replay (:class:`CudaGraphForward`). The CUDA parts are written for, but
were NOT measured on, a GPU (none was available to this work).
"""

from __future__ import annotations

from typing import Any

# Peak activation memory of one forward per input pixel and batch element (both dates), measured on CPU
# for fp32 at tile 256-512 (benchmarks/RESULTS.md section 3: ~430 MiB at 512x512 with SDPA); bf16 halves it.
BYTES_PER_PIXEL_FP32 = 1800


# channels_last on CPU for checkpoint networks: 1.10x fp32, 1.09x bf16 (benchmarks/RESULTS.md section 5).
CPU_CHANNELS_LAST = True


def use_channels_last(device: Any, owned: bool = True) -> bool:
    """NHWC on CUDA always; on CPU only for a network the predictor owns (not a model being trained)."""
    return device.type == "cuda" or (CPU_CHANNELS_LAST and owned)


# STSAM attention for a checkpoint network on CPU, per precision: in bf16 the unpadded chunked form runs its
# bmm's on native bf16 dot products and measured 1.45x faster than SDPA (1.88x vs 1.30x over today's fp32,
# benchmarks/RESULTS.md section 5); in fp32 it measured no faster (0.97-1.14x, within the noise), so SDPA stays.
CPU_ATTENTION = {"bf16": "chunked"}


# Eval BatchNorm folded into the convolution before it, for networks the predictor owns: 1.13x fp32 on this
# CPU for the packaged model, P(change) within 1.5e-5 (benchmarks/RESULTS.md section 6).
FOLD_BATCHNORM = True


def set_attention(model: Any, mode: str) -> None:
    """Switch every STSAM block of ``model`` to ``mode`` (the config keeps its own value: it is a kernel choice)."""
    from cdmap.models.blocks import STSAM

    for module in model.modules():
        if isinstance(module, STSAM):
            module.attention = mode


def cuda_graphs_enabled(device: Any) -> bool:
    import os

    return getattr(device, "type", "cpu") == "cuda" and os.environ.get("CDMAP_CUDA_GRAPHS", "0") == "1"


def to_channels_last(model: Any) -> Any:
    """Conv2d weights in NHWC (``Module.to(memory_format=...)`` refuses the 5-D Conv3d weights of DAWIM)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    return model


def prepare_model(model: Any, device: Any, channels_last: bool | None = None, precision: str | None = None,
                  owned: bool = False) -> Any:
    """The network ready for inference on ``device`` (channels_last on CUDA, where cuDNN prefers NHWC; on CPU
    a network the predictor owns also gets the attention kernel measured fastest for ``precision``, and its
    BatchNorm folded into the convolutions when :data:`FOLD_BATCHNORM`)."""
    if owned and FOLD_BATCHNORM:
        from cdmap.models.fold import fold_batchnorm

        fold_batchnorm(model.eval())
    if use_channels_last(device) if channels_last is None else channels_last:
        model = to_channels_last(model)
    if owned and device.type == "cpu" and precision in CPU_ATTENTION:
        set_attention(model, CPU_ATTENTION[precision])
    return model


def to_device(x: Any, device: Any, channels_last: bool = False) -> Any:
    """A 4-D float tensor on ``device`` from numpy or torch, 3-D or 4-D; pinned + non-blocking to CUDA."""
    import numpy as np
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if t.dim() == 3:
        t = t[None]
    if device.type == "cuda":
        if t.device.type == "cpu":
            t = t.pin_memory()
        t = t.to(device, non_blocking=True)
    elif t.device != device:
        t = t.to(device)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def forward_probability(model: Any, xa: Any, xb: Any, device: Any, dtype: Any) -> Any:
    """P(change) ``(N, H, W)`` float32 on ``device``; the model is put in eval mode for the call."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            logits = model(xa, xb)
        return torch.softmax(logits.float(), dim=1)[:, 1]
    finally:
        model.train(was_training)


class CompiledForward:
    """The forward through ``torch.compile`` (inductor, freezing: weights folded in as constants, convolutions
    pre-packed), one compilation per input shape. Results are fp32-equivalent to eager (max P(change)
    difference about 3e-7 here); the predictor checks that on the first batch of each shape."""

    def __init__(self, model: Any, device: Any, dtype: Any) -> None:
        import torch

        self.device, self.dtype = device, dtype
        self.compiled = torch.compile(model, options={"freezing": True}, dynamic=False)

    def __call__(self, xa: Any, xb: Any) -> Any:
        return forward_probability(self.compiled, xa, xb, self.device, self.dtype)


def cuda_batch_size(device: Any, tile: int, precision: str = "bf16", fraction: float = 0.6,
                    limit: int = 64) -> int:
    """A batch size whose forward fits in ``fraction`` of the free memory on a CUDA ``device`` (1 on CPU)."""
    import torch

    if getattr(device, "type", "cpu") != "cuda":
        return 1
    free, _total = torch.cuda.mem_get_info(device)
    per_pair = BYTES_PER_PIXEL_FP32 * tile * tile * (0.5 if precision in ("bf16", "fp16") else 1.0)
    return int(max(1, min(limit, (free * fraction) // per_pair)))


class CudaGraphForward:
    """Replays a captured CUDA graph of the forward for each (batch, bands, H, W) seen (opt-in, CUDA only).

    Capture needs static input/output buffers: each call copies the batch into them, replays, and returns
    the output buffer's P(change) (valid until the next call of the same shape, so callers copy it out, as
    :meth:`cdmap.inference.Predictor.launch` does). Autocast runs with ``cache_enabled=False`` as graph
    capture requires. Enabled by ``CDMAP_CUDA_GRAPHS=1``; NOT measured (no GPU was available to this work).
    """

    def __init__(self, model: Any, device: Any, dtype: Any, channels_last: bool) -> None:
        self.model, self.device, self.dtype, self.channels_last = model, device, dtype, channels_last
        self._graphs: dict[tuple[int, ...], tuple[Any, Any, Any, Any]] = {}

    def _capture(self, shape: tuple[int, ...]) -> tuple[Any, Any, Any, Any]:
        import torch

        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        xa = torch.zeros(shape, device=self.device).contiguous(memory_format=fmt)
        xb = torch.zeros_like(xa)

        def run() -> Any:
            with torch.inference_mode(), torch.autocast("cuda", dtype=self.dtype or torch.float32,
                                                        enabled=self.dtype is not None, cache_enabled=False):
                return torch.softmax(self.model(xa, xb).float(), dim=1)[:, 1]

        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (cuDNN/cuBLAS workspaces, lazy init)
                run()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        return graph, xa, xb, out

    def __call__(self, xa: Any, xb: Any) -> Any:
        key = tuple(xa.shape)
        if key not in self._graphs:
            self._graphs[key] = self._capture(key)
        graph, sa, sb, out = self._graphs[key]
        sa.copy_(xa, non_blocking=True)
        sb.copy_(xb, non_blocking=True)
        graph.replay()
        return out
