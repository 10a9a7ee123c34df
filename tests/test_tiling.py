"""Window grid, blend weights and the strip stitcher, including property tests over random geometries."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdmap.errors import UsageError
from cdmap.tiling import StripStitcher, WindowGrid, axis_positions, blend_weights_1d


def _coverage(grid: WindowGrid) -> np.ndarray:
    total = np.zeros((grid.height, grid.width), dtype=np.float64)
    for w in grid:
        r0, c0, r1, c1 = w.clip(grid.height, grid.width)
        total[r0:r1, c0:c1] += grid.weights[r0 - w.row : r1 - w.row, c0 - w.col : c1 - w.col]
    return total


def _run_stitcher(grid: WindowGrid, field: np.ndarray, start_row: int = 0):
    """Feed windows whose 'prediction' is ``field`` itself; return strips and the stitcher."""
    st_ = StripStitcher(grid, start_row=start_row)
    padded = np.pad(field, grid.tile, mode="reflect")
    strips = []
    ncols = len(grid.col_positions)
    for w in grid:
        r, c = w.row + grid.tile, w.col + grid.tile
        tile = padded[r : r + grid.tile, c : c + grid.tile].astype(np.float32)
        valid = np.zeros((grid.tile, grid.tile), dtype=bool)
        r0, c0, r1, c1 = w.clip(grid.height, grid.width)
        valid[r0 - w.row : r1 - w.row, c0 - w.col : c1 - w.col] = True
        st_.add(w, tile, valid)
        if (w.index + 1) % ncols == 0:
            s = st_.finish_grid_row(w.grid_row)
            if s is not None:
                strips.append(s)
    return strips, st_


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    tile=st.sampled_from([32, 48, 64, 96]),
    overlap_frac=st.floats(0.0, 0.9),
)
def test_every_pixel_covered_with_positive_weight(height, width, tile, overlap_frac):
    overlap = min(tile - 1, int(tile * overlap_frac))
    grid = WindowGrid(height, width, tile, overlap)
    cov = _coverage(grid)
    assert (cov > 0).all()
    # windows reach at least half the overlap beyond both scene borders
    assert grid.row_positions[0] <= 0 and grid.row_positions[-1] + tile >= height
    assert grid.col_positions[0] <= 0 and grid.col_positions[-1] + tile >= width


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(1, 260),
    width=st.integers(1, 120),
    tile=st.sampled_from([32, 64]),
    overlap=st.sampled_from([0, 8, 16, 24]),
    seed=st.integers(0, 2**16),
)
def test_strips_flushed_exactly_once_and_blend_is_exact(height, width, tile, overlap, seed):
    grid = WindowGrid(height, width, tile, overlap)
    field = np.random.default_rng(seed).random((height, width)).astype(np.float32)
    strips, _ = _run_stitcher(grid, field)
    rows = [r for s in strips for r in range(s.row0, s.row1)]
    assert rows == list(range(height))  # every row once, in order
    out = np.concatenate([s.prob for s in strips])
    # every window predicts the same field, so any weighted average must return it
    np.testing.assert_allclose(out, field, atol=1e-6)


def test_resumed_stitcher_gives_identical_rows():
    grid = WindowGrid(300, 140, 64, 16)
    rng = np.random.default_rng(3)
    # window-dependent predictions: the blend is a real average, so order and sums matter
    field = rng.random((300, 140)).astype(np.float32)
    full, _ = _run_stitcher(grid, field)
    start = full[2].row0
    resumed, _ = _run_stitcher(grid, field, start_row=start)
    a = np.concatenate([s.prob for s in full])[start:]
    b = np.concatenate([s.prob for s in resumed])
    assert np.array_equal(a, b)


def test_weights_shape_margin_and_positive_centre():
    w = blend_weights_1d(64, 16)
    assert w.shape == (64,)
    assert (w[:4] == 0).all() and (w[-4:] == 0).all()  # margin = overlap // 4
    assert (w[16:48] == 1).all()
    assert np.all(np.diff(w[:16]) >= 0)
    assert np.array_equal(blend_weights_1d(64, 0), np.ones(64, np.float32))


def test_small_scene_is_one_reflected_window():
    grid = WindowGrid(10, 20, 64, 16)
    assert len(grid) == 1
    assert grid.row_positions == [-8] and grid.col_positions == [-8]


def test_axis_positions_cover_right_edge():
    pos = axis_positions(1000, 256, 64)
    assert pos[0] == -32 and pos[-1] + 256 >= 1000 + 32
    assert all(b - a == 192 for a, b in zip(pos, pos[1:], strict=False))


@pytest.mark.parametrize("tile,overlap", [(64, 64), (64, 80), (64, -1), (16, 0)])
def test_bad_tile_or_overlap_is_a_usage_error(tile, overlap):
    with pytest.raises(UsageError):
        WindowGrid(100, 100, tile, overlap)


def test_seam_ratio_shows_seams_without_overlap_and_not_with_blending():
    """Windows that disagree by a constant offset: seams appear at window lines without overlap only."""
    h = w = 256
    rng = np.random.default_rng(0)
    base = rng.random((h, w)).astype(np.float32) * 0.1 + 0.45

    def run(overlap):
        grid = WindowGrid(h, w, 64, overlap)
        st_ = StripStitcher(grid)
        ncols = len(grid.col_positions)
        padded = np.pad(base, 64, mode="reflect")
        for win in grid:
            off = 0.2 * ((win.index * 7919) % 5) / 4  # each window biased differently
            tile = padded[win.row + 64 : win.row + 128, win.col + 64 : win.col + 128] + off
            st_.add(win, tile.astype(np.float32), np.ones((64, 64), bool))
            if (win.index + 1) % ncols == 0:
                st_.finish_grid_row(win.grid_row)
        return st_.stats

    hard, soft = run(0), run(32)
    assert hard.seam_ratio > 2.0
    assert soft.seam_ratio < hard.seam_ratio / 2
    assert soft.overlap_disagreement > 0 and hard.overlap_disagreement is None
