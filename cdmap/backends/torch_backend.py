"""The torch path (the reference, and the only one on CUDA): eval model, inference_mode, autocast.

CPU: fp32 by default with STSAM on its fused SDPA kernel, which measured fastest in eager torch here
(benchmarks/RESULTS.md section 5); bf16 autocast when asked for. CUDA: channels_last, bf16/fp16 autocast,
pinned non-blocking host-to-device copies (so the caller reads the next batch meanwhile), and a batch size
that fits the free memory (:func:`cuda_batch_size`). The CUDA parts are written for, not measured on, a GPU.
"""

from __future__ import annotations

from typing import Any

# Peak activation memory of one forward per input pixel and batch element (both dates), measured on CPU
# for fp32 at tile 256-512 (benchmarks/RESULTS.md section 3: ~430 MiB at 512x512 with SDPA); bf16 halves it.
BYTES_PER_PIXEL_FP32 = 1800


# channels_last on CPU: measured in benchmarks/RESULTS.md section 5 (no gain in fp32 eager torch here).
CPU_CHANNELS_LAST = False


def use_channels_last(device: Any) -> bool:
    return device.type == "cuda" or CPU_CHANNELS_LAST


def to_channels_last(model: Any) -> Any:
    """Conv2d weights in NHWC (``Module.to(memory_format=...)`` refuses the 5-D Conv3d weights of DAWIM)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    return model


def prepare_model(model: Any, device: Any, channels_last: bool | None = None) -> Any:
    """The network ready for inference on ``device`` (channels_last on CUDA, where cuDNN prefers NHWC)."""
    if use_channels_last(device) if channels_last is None else channels_last:
        model = to_channels_last(model)
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


def cuda_batch_size(device: Any, tile: int, precision: str = "bf16", fraction: float = 0.6,
                    limit: int = 64) -> int:
    """A batch size whose forward fits in ``fraction`` of the free memory on a CUDA ``device`` (1 on CPU)."""
    import torch

    if getattr(device, "type", "cpu") != "cuda":
        return 1
    free, _total = torch.cuda.mem_get_info(device)
    per_pair = BYTES_PER_PIXEL_FP32 * tile * tile * (0.5 if precision in ("bf16", "fp16") else 1.0)
    return int(max(1, min(limit, (free * fraction) // per_pair)))
