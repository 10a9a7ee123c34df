"""Training FSG-Net on LEVIR-CD-style tiles: ``train(data_dir, run_dir, TrainConfig(...)) -> TrainResult`` and
``resume(run_dir)``.

Submodules: :mod:`~cdmap.train.config` (the recipe :class:`TrainConfig`, the :class:`TrainRuntime`, the result),
:mod:`~cdmap.train.loop` (``train``, ``resume`` and the epoch steps), :mod:`~cdmap.train.build` (building a
session), :mod:`~cdmap.train.data` (statistics, training crops, the epoch sampler), :mod:`~cdmap.train.augment`
(joint augmentations), :mod:`~cdmap.train.losses` (CE + Dice), :mod:`~cdmap.train.state` (schedule, RNG states) and
:mod:`~cdmap.train.tiles` (cutting a georeferenced scene pair into training tiles); the torchrun process group is
:mod:`cdmap.distributed`, shared with predict. Tile folders themselves are :mod:`cdmap.data`. Names are imported
on first use, so ``cdmap.train.tiles`` does not pull in torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cdmap.train.config import TrainConfig, TrainResult, TrainRuntime
    from cdmap.train.loop import resume, train

_EXPORTS = {
    "TrainConfig": "cdmap.train.config",
    "TrainResult": "cdmap.train.config",
    "TrainRuntime": "cdmap.train.config",
    "resume": "cdmap.train.loop",
    "train": "cdmap.train.loop",
}
__all__ = ["TrainConfig", "TrainResult", "TrainRuntime", "resume", "train"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cdmap.train' has no attribute {name!r}")
