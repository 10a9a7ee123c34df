"""The seam ratio sees an edge effect that adds up along the seams, and calibration picks an overlap that hides it
(a fake network that darkens its output near the window border: a known edge effect)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdmap.tiling import StripStitcher, WindowGrid


def _field(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random 'probability' content in [0, 1]."""
    t = torch.rand(1, 1, n, n, generator=torch.Generator().manual_seed(seed))
    for _ in range(2):
        t = torch.nn.functional.avg_pool2d(t, 7, 1, 3, count_include_pad=False)
    f = t[0, 0].numpy()
    return (f - f.min()) / (f.max() - f.min())


def _edge_distance(tile: int) -> np.ndarray:
    d = np.minimum(np.arange(tile), np.arange(tile)[::-1])
    return np.minimum.outer(d, d)


def _blend(field: np.ndarray, tile: int, overlap: int, k: int, delta: float, margin: int | None = None):
    """Stitch windows of ``field`` each darkened by ``delta`` (fading out) within ``k`` px of its border."""
    n = field.shape[0]
    grid = WindowGrid(n, n, tile, overlap, margin)
    dark = np.where(_edge_distance(tile) < k, delta * (1 - _edge_distance(tile) / max(k, 1)), 0.0)
    pad = np.pad(field, tile, mode="reflect")
    st = StripStitcher(grid)
    ncols = len(grid.col_positions)
    for w in grid:
        win = pad[w.row + tile : w.row + 2 * tile, w.col + tile : w.col + 2 * tile] - dark
        st.add(w, win.astype(np.float32), np.ones((tile, tile), bool))
        if (w.index + 1) % ncols == 0:
            st.finish_grid_row(w.grid_row)
    return st.stats


def test_seam_ratio_sees_an_edge_effect_the_old_steps_missed():
    field = 0.25 + 0.5 * _field(512)  # probability-like content, 0.25-0.75
    assert _blend(field, 128, 0, 0, 0.0).seam_ratio <= 1.1  # no edge effect, no seam
    hard = _blend(field, 128, 0, 8, 0.1).seam_ratio
    assert hard > 1.3  # dark lines at the window borders
    # blended over a ramp the same effect is spread out but still visible with a too-small overlap
    assert _blend(field, 128, 16, 32, 0.1).seam_ratio > 1.1
    assert _blend(field, 128, 64, 32, 0.1).seam_ratio <= 1.1


def _strip_stats(grid: WindowGrid, pad: np.ndarray, dark: np.ndarray, start_row: int = 0, first: int = 0):
    """Seam statistics of the strips from grid row ``first`` on, from a stitcher started at ``start_row``."""
    from cdmap.tiling.stitch import BlendStats

    t = grid.tile
    st = StripStitcher(grid, start_row=start_row)
    ncols, total = len(grid.col_positions), BlendStats()
    for w in grid:
        if w.row + t <= start_row:
            continue
        st.add(w, (pad[w.row + t : w.row + 2 * t, w.col + t : w.col + 2 * t] - dark).astype(np.float32),
               np.ones((t, t), bool))
        strip = st.finish_grid_row(w.grid_row) if (w.index + 1) % ncols == 0 else None
        if strip is not None and w.grid_row >= first:
            total.add(strip.stats)
    return total


def test_seam_ratio_is_a_sum_of_strips_and_resume_matches():
    """Row steps straddle strips: a stitcher started one row above a strip scores it as one run does."""
    grid = WindowGrid(256, 256, 64, 16)
    dark = np.where(_edge_distance(64) < 6, 0.1, 0.0)
    pad = np.pad(_field(256, seed=1), 64, mode="reflect")
    k = 2
    whole = _strip_stats(grid, pad, dark, first=k)
    resumed = _strip_stats(grid, pad, dark, max(grid.rows_final_after(k - 1) - 1, 0), k)
    assert sum(whole.zone_hist) > 0 and sum(whole.control_hist) > 0
    assert resumed.to_dict() == whole.to_dict()


class EdgeDarkening(torch.nn.Module):
    """A stand-in network: logit of change from the image difference, pushed down within ``k`` px of the window
    border (a model's edge effect of known depth)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        diff = (b - a).mean(1)
        h, w = diff.shape[-2:]
        d = torch.minimum(torch.arange(h)[:, None].minimum(torch.arange(h).flip(0)[:, None]),
                          torch.arange(w)[None].minimum(torch.arange(w).flip(0)[None]))
        logit = 2.0 * diff - 3.0 * (d < self.k).float()
        return torch.stack([torch.zeros_like(logit), logit], 1)


def test_calibration_chooses_an_overlap_that_hides_the_edge_effect():
    from cdmap.calibrate import TARGET_RATIO, choose, seam_ratio
    from cdmap.inference import Predictor

    rng = np.random.default_rng(0)
    images = []
    for i in range(3):  # textured change everywhere: the stand-in's output has content in every window
        a = _field(192, seed=10 + i)[None].repeat(3, 0) * 2
        b = a + 1.5 * _field(192, seed=20 + i)[None] - 0.75
        images.append((a.astype(np.float32), (b + 0.01 * rng.standard_normal(b.shape)).astype(np.float32),
                       np.ones((192, 192), bool)))
    predictor = Predictor(EdgeDarkening(k=6), [0.0] * 3, [1.0] * 3, device="cpu", precision="fp32")
    cal = choose(predictor, 64, images)
    print(cal.candidates)
    assert cal.candidates[0]["overlap"] == 0 and cal.candidates[0]["seam_ratio"] > 1.5
    assert cal.seam_ratio <= TARGET_RATIO
    assert all(c["seam_ratio"] > TARGET_RATIO for c in cal.candidates[:-1])  # the first one that hides it
    assert cal.margin >= 4  # most of the darkened pixels are thrown away
    # the edge profile finds the darkened border: 6 px, in bins of 4 px
    assert cal.edge["depth"] == 8 and cal.edge["mean_abs_diff"][0] > 10 * cal.edge["mean_abs_diff"][-1]
    from cdmap.calibrate import scenes

    assert seam_ratio(predictor, scenes(images, 64), 64, cal.overlap, cal.margin) == cal.seam_ratio


def test_checkpoint_carries_the_calibration_and_predict_uses_it(tmp_path):
    from dataclasses import replace

    from cdmap.checkpoint import load_checkpoint, save_checkpoint
    from cdmap.errors import CheckpointError
    from cdmap.predict import PredictOptions
    from cdmap.predict.plan import make_plan
    from tests.helpers import tiny_checkpoint

    old = load_checkpoint(tiny_checkpoint(tmp_path / "t.pt"))
    assert old.overlap is None and make_plan(PredictOptions(), old).overlap == 8  # tile/8 without a calibration
    ck = replace(old, overlap=24, blend_margin=8, seam_calibration={"seam_ratio": 1.02})
    back = load_checkpoint(save_checkpoint(ck, tmp_path / "c.pt"))
    assert (back.overlap, back.blend_margin, back.seam_calibration) == (24, 8, {"seam_ratio": 1.02})
    plan = make_plan(PredictOptions(), back).on_grid(100, 100)
    assert (plan.overlap, plan.grid.blend_margin) == (24, 8)
    told = make_plan(PredictOptions(overlap=16), back).on_grid(100, 100)
    assert (told.overlap, told.grid.blend_margin) == (16, 4)  # an explicit overlap keeps the overlap/4 margin
    save_checkpoint(replace(old, overlap=8, blend_margin=6), tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="blend_margin"):
        load_checkpoint(tmp_path / "bad.pt")


def test_cdmap_calibrate_writes_a_calibrated_copy_and_refuses_bad_targets(tmp_path):
    import subprocess
    import sys

    from cdmap.checkpoint import load_checkpoint
    from cdmap.synthetic import write_tile_set
    from tests.helpers import tiny_checkpoint

    data = write_tile_set(tmp_path / "data", n_train=2, n_val=2, n_test=1, size=64)
    ck = tiny_checkpoint(tmp_path / "t.pt")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "cdmap", "calibrate", *map(str, args)], capture_output=True,
                              text=True)

    proc = cli(ck, data, "-o", tmp_path / "c.pt", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "NotGeoreferenced" not in proc.stderr  # labelled tiles are pixel grids: no warning for that
    assert "overlap" in proc.stdout and str(tmp_path / "c.pt") in proc.stdout
    cal = load_checkpoint(tmp_path / "c.pt")
    assert cal.overlap is not None and cal.seam_calibration["edge"]["bin_px"] == 4
    assert [c["overlap"] for c in cal.seam_calibration["candidates"]][0] == 0
    assert load_checkpoint(ck).overlap is None  # the source is untouched with --output
    info = subprocess.run([sys.executable, "-m", "cdmap", "info", str(tmp_path / "c.pt")], capture_output=True,
                          text=True).stdout
    assert f"overlap {cal.overlap}, margin {cal.blend_margin} (measured on" in info
    packaged = cli("fsgnet-rgb-v1", data)
    assert packaged.returncode == 2 and "packaged model" in packaged.stderr
    assert len(packaged.stderr.strip().splitlines()) == 1
    missing = cli(tmp_path / "none.pt", data)
    assert missing.returncode == 5 and "none.pt" in missing.stderr
