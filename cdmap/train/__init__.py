"""Training FSG-Net on LEVIR-CD-style tiles: ``train(data_dir, run_dir, TrainConfig(...)) -> TrainResult``.

Submodules: :mod:`~cdmap.train.data` (discovery, validation, statistics, datasets), :mod:`~cdmap.train.augment`
(joint augmentations), :mod:`~cdmap.train.losses` (CE + Dice), :mod:`~cdmap.train.loop` (the trainer) and
:mod:`~cdmap.train.tiles` (cutting a georeferenced scene pair into training tiles). The trainer is imported on
first use, so ``cdmap.train.tiles`` does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cdmap.train.loop import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from cdmap.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'cdmap.train' has no attribute {name!r}")
