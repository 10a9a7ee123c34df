"""``cdmap predict --pairs``: one folder per pair, ``index.gpkg`` with a row per pair, pairs spread over two
gloo ranks, a bad pair in the middle recorded without stopping the others, and ``--resume``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import geopandas as gpd
import pytest
import shapely

from cdmap.errors import EXIT_INPUT, InputError, OutputError
from cdmap.predict import predict_pairs, predict_scene, read_pairs
from cdmap.predict.pairs import assign_pairs
from cdmap.predict.ranks import strip_spans
from cdmap.tiling import WindowGrid
from tests.conftest import synthetic_pair
from tests.helpers import assert_same_outputs, cdmap_env, tiny_checkpoint, torchrun_cmd

OPTS = ["--batch-size", "3", "--threshold", "0.526", "--quiet"]


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    scenes = d / "scenes"
    scenes.mkdir()
    a_before, a_after, _ = synthetic_pair(scenes, height=160, width=96, seed=1)
    b_dir = scenes / "b"
    b_dir.mkdir()
    synthetic_pair(b_dir, height=96, width=128, seed=2)
    ckpt = tiny_checkpoint(d / "tiny.pt")
    csv = scenes / "pairs.csv"
    csv.write_text("name,before,after\nfirst,before.tif,after.tif\nbroken,missing.tif,after.tif\n"
                   ",b/before.tif,b/after.tif\n")
    ref = predict_scene(a_before, a_after, d / "ref", ckpt, quiet=True, batch_size=3, threshold=0.526)
    return d, csv, ckpt, ref


def test_read_pairs_resolves_paths_and_names(campaign, tmp_path):
    _, csv, _, _ = campaign
    specs = read_pairs(csv)
    assert [s.name for s in specs] == ["first", "broken", "0003_before"]
    assert specs[2].before == csv.parent.absolute() / "b" / "before.tif"
    bad = tmp_path / "bad.csv"
    bad.write_text("before,after,name\nx.tif,y.tif,same\nz.tif,w.tif,same\n")
    with pytest.raises(InputError, match="used by an earlier row"):
        read_pairs(bad)
    bad.write_text("before\nx.tif\n")
    with pytest.raises(InputError, match="columns before and after"):
        read_pairs(bad)


def test_pairs_are_balanced_by_pixels():
    assert assign_pairs([100, 10, 90, 20], 2) == [0, 0, 1, 1]  # 100+10 and 90+20
    assert assign_pairs([5, 5, 5], 1) == [0, 0, 0]


def _index(out):
    return gpd.read_file(out / "index.gpkg", layer="pairs")


def test_two_ranks_with_a_bad_pair_in_the_middle(campaign, tmp_path):
    d, csv, ckpt, ref = campaign
    out = tmp_path / "campaign"
    proc = subprocess.run(list(map(str, torchrun_cmd(2, "predict", "--pairs", csv, "-o", out, "--model", ckpt,
                                                     *OPTS))), env=cdmap_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0  # a failed pair fails the job, after the others are done
    assert "1 of 3 pairs failed" in proc.stderr and "broken" in proc.stderr, proc.stderr[-3000:]
    idx = _index(out)
    assert idx.crs.to_epsg() == 4326
    assert list(idx["name"]) == ["first", "broken", "0003_before"]
    assert list(idx["status"]) == ["done", "failed", "done"]
    assert sorted(set(idx["rank"])) == [0, 1]  # spread over both ranks
    bad = idx.iloc[1]
    assert "missing.tif" in bad["error"] and bad["exit_code"] == EXIT_INPUT
    assert bad.geometry is None or bad.geometry.is_empty
    assert not (out / "broken" / "run.json").exists()
    for _, row in idx[idx["status"] == "done"].iterrows():
        folder = out / row["output"]
        summary = json.loads((folder / "run.json").read_text())
        assert row["changed_area_m2"] == summary["changed_area_m2"]
        assert row["polygons"] == summary["polygons"] == len(gpd.read_file(folder / "changes.gpkg"))
        assert (row["width"], row["height"]) == (summary["inputs"]["width"], summary["inputs"]["height"])
        with __import__("rasterio").open(folder / "change_mask.tif") as ds:  # the footprint is the scene's
            b = ds.bounds
            centre = shapely.Point((b.left + b.right) / 2, (b.bottom + b.top) / 2)
            centre = gpd.GeoSeries([centre], crs=ds.crs).to_crs(4326).iloc[0]
        assert row.geometry.contains(centre) and row.geometry.is_valid
    assert_same_outputs(out / "first", ref.outdir)  # a pair's outputs are those of a single predict


def test_resume_keeps_finished_pairs_and_continues_unfinished_ones(campaign, tmp_path):
    d, csv, ckpt, ref = campaign
    out = tmp_path / "campaign"
    # SIGKILL at the 4th strip overall: the first pair (3 strips) is finished, the third (2 strips) is not
    killed = subprocess.run([sys.executable, "-m", "cdmap", "predict", "--pairs", str(csv), "-o", str(out),
                             "--model", str(ckpt), *OPTS], env=cdmap_env(CDMAP_FAULT_INJECT="strip:4"),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert (out / "first" / "run.json").is_file() and not (out / "index.gpkg").exists()
    assert (out / "0003_before" / ".cdmap-partial" / "journal.jsonl").is_file()
    first_mtime = (out / "first" / "run.json").stat().st_mtime_ns

    with pytest.raises(OutputError, match="exists"):  # a later campaign never replaces one silently
        shutil.copy(csv, out / "index.gpkg")
        predict_pairs(csv, out, ckpt, quiet=True, batch_size=3, threshold=0.526)
    (out / "index.gpkg").unlink()
    result = predict_pairs(csv, out, ckpt, quiet=True, batch_size=3, threshold=0.526, resume=True)
    assert [p.status for p in result.pairs] == ["done", "failed", "done"]
    assert (out / "first" / "run.json").stat().st_mtime_ns == first_mtime  # kept, not recomputed
    third = json.loads((out / "0003_before" / "run.json").read_text())
    n_strips = len(strip_spans(WindowGrid(96, 128, 64, 8)))
    assert 0 < third["ranks"]["per_rank"][0]["strips"] < n_strips  # resumed: only the strips left
    assert_same_outputs(out / "first", ref.outdir)
    assert list(_index(out)["status"]) == ["done", "failed", "done"]
