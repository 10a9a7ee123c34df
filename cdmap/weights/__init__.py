"""Models packaged with cdmap: every ``*.pt`` file in this folder is one, named by its stem.

``cdmap predict`` without ``--model`` uses :data:`DEFAULT_MODEL`; ``--model NAME`` picks another packaged model
and ``--model PATH`` a checkpoint file. Each packaged checkpoint carries its model card (``Checkpoint.card``):
what it was trained on, for which bands and pixel sizes, under which licence, and how it scored on pairs it
never saw. The files are ordinary cdmap checkpoints (half-precision weights), loaded with ``weights_only=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdmap.errors import CheckpointError

if TYPE_CHECKING:
    from cdmap.checkpoint import Checkpoint

FOLDER = Path(__file__).resolve().parent
DEFAULT_MODEL = "fsgnet-rgb-v1"
"""The model ``predict`` and ``evaluate`` use when no ``--model`` is given."""


def packaged_names() -> list[str]:
    """Names of the packaged models, the default first."""
    names = sorted(p.stem for p in FOLDER.glob("*.pt"))
    return sorted(names, key=lambda n: n != DEFAULT_MODEL)


def model_path(model: str | os.PathLike | None) -> Path:
    """The checkpoint file for ``model``: None -> the default model, a packaged name -> its file, else a path.

    A string that is neither a packaged name nor an existing file raises :class:`CheckpointError` naming the
    packaged models.
    """
    if model is None:
        model = DEFAULT_MODEL
    text = os.fspath(model)
    packaged = FOLDER / f"{text}.pt"
    if os.sep not in text and not text.endswith(".pt") and not Path(text).exists():
        if packaged.is_file():
            return packaged
        names = ", ".join(packaged_names()) or "none installed"
        if text == DEFAULT_MODEL:
            raise CheckpointError("the packaged default model file is missing (reinstall cdmap, or pass --model "
                                  "PATH)", packaged)
        raise CheckpointError(f"neither a packaged model (packaged: {names}) nor a checkpoint file", text)
    return Path(text)


def load_model(model: str | os.PathLike | None = None) -> Checkpoint:
    """The checkpoint of ``model`` (see :func:`model_path`): ``cdmap.load_model()`` is the default model."""
    from cdmap.checkpoint import load_checkpoint

    return load_checkpoint(model_path(model))


def packaged_models() -> list[dict[str, Any]]:
    """One entry per packaged model: name, file, size, whether it is the default, and its model card."""
    from cdmap.checkpoint import load_checkpoint

    out = []
    for name in packaged_names():
        path = FOLDER / f"{name}.pt"
        ckpt = load_checkpoint(path)
        out.append({"name": name, "default": name == DEFAULT_MODEL, "path": str(path),
                    "bytes": path.stat().st_size, "sha256": ckpt.sha256, "card": ckpt.card})
    return out
