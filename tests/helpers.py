"""Test helpers shared by several test modules (not fixtures)."""

from __future__ import annotations

from pathlib import Path


def tiny_checkpoint(path: Path, *, in_channels: int = 3, tile: int = 64, seed: int = 0, gamma: float = 0.5,
                    threshold: float = 0.5, mean: float = 100.0, std: float = 50.0) -> Path:
    """A randomly initialised FSG-Net checkpoint with the cross-attention switched on (gamma != 0)."""
    import torch

    from cdmap.checkpoint import Checkpoint, save_checkpoint
    from cdmap.models import FSGNet, ModelConfig

    torch.manual_seed(seed)
    model = FSGNet(ModelConfig(in_channels=in_channels))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(gamma)
    ckpt = Checkpoint(ModelConfig(in_channels=in_channels), model.state_dict(), [mean] * in_channels,
                      [std] * in_channels, tile_size=tile, threshold=threshold)
    return save_checkpoint(ckpt, path)
