"""cdmap: change maps, masks and polygons from two co-registered GeoTIFF scenes with FSG-Net.

The public functions are imported lazily so that ``import cdmap`` (and ``cdmap --help``) stays fast:

- :func:`cdmap.predict_scene` (``cdmap predict``)
- :func:`cdmap.vectorize_raster` (``cdmap vectorize``)
- :func:`cdmap.train.train`, :func:`cdmap.train.resume` (``cdmap train``; ``cdmap.train`` is the training package)
- :class:`cdmap.Predictor` (one network + normalisation + device, used by predict, evaluate and training)
- :func:`cdmap.evaluate_tiles`, :func:`cdmap.evaluate_scene` (``cdmap evaluate``)
- :func:`cdmap.load_checkpoint`, :func:`cdmap.save_checkpoint`, :class:`cdmap.Checkpoint`
- :func:`cdmap.load_model`, :func:`cdmap.packaged_models` (the models packaged with cdmap, ``cdmap models``)
- :class:`cdmap.FSGNet`, :class:`cdmap.ModelConfig`
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from cdmap._version import __version__

_EXPORTS = {
    "predict_scene": "cdmap.predict",
    "PredictOptions": "cdmap.predict",
    "PredictResult": "cdmap.predict",
    "vectorize_raster": "cdmap.vector",
    "TrainConfig": "cdmap.train",
    "TrainRuntime": "cdmap.train",
    "Predictor": "cdmap.inference",
    "evaluate_tiles": "cdmap.evaluate",
    "evaluate_scene": "cdmap.evaluate",
    "load_checkpoint": "cdmap.checkpoint",
    "save_checkpoint": "cdmap.checkpoint",
    "Checkpoint": "cdmap.checkpoint",
    "load_model": "cdmap.weights",
    "packaged_models": "cdmap.weights",
    "FSGNet": "cdmap.models",
    "ModelConfig": "cdmap.models.config",
    "open_pair": "cdmap.raster.pair",
    "tune_allocator": "cdmap.allocator",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cdmap' has no attribute {name!r}")
