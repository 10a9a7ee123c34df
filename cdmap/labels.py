"""Change labels: **the one decoding rule**, used wherever labels are read (tile folders, ``cdmap tiles``,
``cdmap evaluate --scene``).

A label raster (band 1) is coded either automatically or by ``label_values``:

- automatic (``label_values=None``): the values must lie within ``{0, 1}`` or within ``{0, 255}``; 0 is no
  change, the other value change. Anything else is refused. ``{1, 2}`` (OSCD: 1 = no change, 2 = change) gets
  an error that names ``--label-values 1,2``: read as "non-zero = change" it marks the whole scene as change.
- ``label_values=(no_change, change)``, e.g. ``(1, 2)``: only those two values are accepted.

In both cases the ignore index, the raster's nodata value and NaN are "ignored" pixels. Decoded labels are
uint8: 0 no change, 1 change, :data:`IGNORE_INDEX` ignored.

A label raster without georeferencing (no CRS) next to a georeferenced scene is accepted only with
``pixel_grid=True`` (``--labels-pixel-grid``) and only when its size equals the scene's
(:func:`check_label_grid`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from cdmap.errors import IncompatibleInputsError, InputError, UsageError

IGNORE_INDEX = 255
"""The decoded value of pixels that count in no loss or metric (0 no change, 1 change)."""

AUTO_CODINGS = ((0, 1), (0, 255))


def parse_label_values(text: str | Iterable[int] | None) -> tuple[int, int] | None:
    """``"1,2"`` -> ``(1, 2)`` (no change, change); None stays None (automatic)."""
    if text is None:
        return None
    try:
        parts = [int(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--label-values expects NO_CHANGE,CHANGE such as 1,2, got {text!r}") from exc
    if len(parts) != 2 or parts[0] == parts[1]:
        raise UsageError(f"--label-values expects two different values NO_CHANGE,CHANGE such as 1,2, got {text!r}")
    return parts[0], parts[1]


def distinct_values(raw: np.ndarray, ignore_index: int | None = None, nodata: float | None = None) -> set[float]:
    """The label values present in ``raw``, without NaN, the ignore index and the nodata value."""
    if raw.dtype == np.uint8:
        vals = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
    else:
        vals = np.unique(raw)
        if np.issubdtype(vals.dtype, np.floating):
            vals = vals[~np.isnan(vals)]
    out = {v.item() for v in vals}
    for skip in (ignore_index, nodata):
        if skip is not None and not (isinstance(skip, float) and np.isnan(skip)):
            out.discard(skip)
    return out


def label_problem(values: set[float], label_values: tuple[int, int] | None = None) -> str | None:
    """Why label ``values`` (from :func:`distinct_values`) cannot be decoded, or None when they can."""
    shown = "{" + ", ".join(_fmt(v) for v in sorted(values)[:8]) + (", ..." if len(values) > 8 else "") + "}"
    if label_values is not None:
        if values <= set(label_values):
            return None
        return (f"label has values {shown} outside --label-values {label_values[0]},{label_values[1]} "
                f"(no change, change)")
    if any(values <= set(c) for c in AUTO_CODINGS):
        return None
    if values <= {1, 2}:
        return (f"label has values {shown}: if 1 = no change and 2 = change (as in OSCD), pass "
                f"--label-values 1,2")
    return (f"label has values {shown}; expected 0/1 or 0/255 (0 = no change), or pass "
            f"--label-values NO_CHANGE,CHANGE")


def decode_labels(raw: np.ndarray, label_values: tuple[int, int] | None = None, ignore_index: int | None = None,
                  nodata: float | None = None) -> np.ndarray:
    """Decoded uint8 labels (0, 1, :data:`IGNORE_INDEX`); check the values first with :func:`label_problem`."""
    if label_values is None:
        out = (raw != 0).astype(np.uint8)
    else:
        out = np.full(raw.shape, IGNORE_INDEX, dtype=np.uint8)
        out[raw == label_values[0]] = 0
        out[raw == label_values[1]] = 1
    for skip in (ignore_index, nodata):
        if skip is not None and not (isinstance(skip, float) and np.isnan(skip)):
            out[raw == skip] = IGNORE_INDEX
    if np.issubdtype(raw.dtype, np.floating):
        out[np.isnan(raw)] = IGNORE_INDEX
    return out


def read_labels(raw: np.ndarray, where: Any, label_values: tuple[int, int] | None = None,
                ignore_index: int | None = None, nodata: float | None = None) -> np.ndarray:
    """Check and decode ``raw`` in one call (:class:`InputError` naming ``where`` when the values are wrong)."""
    if np.issubdtype(raw.dtype, np.floating) and not np.all(np.isnan(raw) | (raw == np.round(raw))):
        raise InputError("label holds non-integer values (a probability map, or a resampled label?)", where)
    why = label_problem(distinct_values(raw, ignore_index, nodata), label_values)
    if why:
        raise InputError(why, where)
    return decode_labels(raw, label_values, ignore_index, nodata)


def check_label_grid(label: Any, scene: Any, where: Any, pixel_grid: bool = False) -> None:
    """A label raster must be on ``scene``'s grid; without CRS only with ``pixel_grid`` and the same size."""
    from cdmap.raster.grid import same_grid

    size = f"{label.width}x{label.height}"
    ref = f"{scene.width}x{scene.height}"
    if label.crs is None and scene.crs is not None:
        if not pixel_grid:
            raise IncompatibleInputsError(
                f"label raster ({size}) has no georeferencing; if its pixels are those of BEFORE ({ref}), "
                f"pass --labels-pixel-grid", where)
        if (label.width, label.height) != (scene.width, scene.height):
            raise IncompatibleInputsError(f"label raster without georeferencing is {size}, BEFORE is {ref}: "
                                          f"--labels-pixel-grid needs the same size", where)
        return
    if not same_grid(label, scene, allow_missing_crs=pixel_grid):
        raise IncompatibleInputsError(f"label raster ({size}) is not on the grid of {ref} pixels it is "
                                      f"compared with", where)


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"
