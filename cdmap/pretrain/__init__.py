"""CMID self-supervised pretraining of a backbone on unlabelled scenes: ``pretrain(data, run_dir, config,
runtime)`` and ``resume(run_dir)``; the specification is ``shared/design/cmid.md``.

Submodules: :mod:`~cdmap.pretrain.config` (recipe, presets, runtime, result; no torch),
:mod:`~cdmap.pretrain.sources` (image discovery, statistics, random valid windows), :mod:`~cdmap.pretrain.views`
(the two crops, augmentation, block masks, cell centres), :mod:`~cdmap.pretrain.model` (student, EMA teacher,
heads, queue, centre), :mod:`~cdmap.pretrain.losses`, :mod:`~cdmap.pretrain.schedule`,
:mod:`~cdmap.pretrain.loop` (steps, epochs, resume) and :mod:`~cdmap.pretrain.export` (``backbone.pt``,
``last.pt``, ``--init``). Names are imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cdmap.pretrain.config import PretrainConfig, PretrainResult, PretrainRuntime
    from cdmap.pretrain.export import load_pretrained
    from cdmap.pretrain.loop import pretrain, resume

_EXPORTS = {
    "PretrainConfig": "cdmap.pretrain.config",
    "PretrainResult": "cdmap.pretrain.config",
    "PretrainRuntime": "cdmap.pretrain.config",
    "load_pretrained": "cdmap.pretrain.export",
    "pretrain": "cdmap.pretrain.loop",
    "resume": "cdmap.pretrain.loop",
}
__all__ = ["PretrainConfig", "PretrainResult", "PretrainRuntime", "load_pretrained", "pretrain", "resume"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cdmap.pretrain' has no attribute {name!r}")
