"""Inputs GDAL users pass every day: /vsicurl/ and plain http:// URLs (a COG served with range requests by a
local HTTP server on 127.0.0.1) and /vsizip/ paths, in predict, evaluate, tiles and vectorize; resume identifies
them by what GDAL reports."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil

from tests.conftest import synthetic_pair, write_geotiff
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A COG pair, a label raster and a zip of them, served on 127.0.0.1; yields (folder, base URL)."""
    root = tmp_path_factory.mktemp("served")
    before, after, truth = synthetic_pair(root, height=64, width=64, seed=3)
    for p in (before, after):
        rasterio.shutil.copy(p, root / f"{p.stem}_cog.tif", driver="COG")
    with rasterio.open(before) as src:
        write_geotiff(root / "labels.tif", truth * 255, transform=src.transform)
        write_geotiff(root / "mask.tif", truth, transform=src.transform)
    with zipfile.ZipFile(root / "pair.zip", "w") as zf:
        for name in ("before.tif", "after.tif", "labels.tif"):
            zf.write(root / name, f"inner/{name}")
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("range_server.py")), str(root)],
                              stdout=subprocess.PIPE, text=True)
    port = int(server.stdout.readline())
    old = {k: os.environ.get(k) for k in ("NO_PROXY", "no_proxy", "GDAL_HTTP_MAX_RETRY")}
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1"  # never through a proxy
    os.environ["GDAL_HTTP_MAX_RETRY"] = "0"
    try:
        yield root, f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "m.pt", tile=32)


def _cli(*argv) -> str:
    """Run the CLI in this process (as the console script does); its stdout."""
    from cdmap.cli.app import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([str(a) for a in argv])  # an error exits (SystemExit) and fails the test
    return out.getvalue()


def test_identity_of_remote_zip_and_local_inputs(served):
    from cdmap.raster.identity import input_identity, same_content

    root, url = served
    local = input_identity(root / "before_cog.tif")
    remote = input_identity(f"/vsicurl/{url}/before_cog.tif")
    zipped = input_identity(f"/vsizip/{root / 'pair.zip'}/inner/before.tif")
    assert (root / "ranges.log").read_text(), "GDAL's /vsicurl/ read the COG without range requests"
    assert "bytes" in local and "bytes" not in remote and "bytes" not in zipped  # no stat on non-files
    assert remote["path"] == f"/vsicurl/{url}/before_cog.tif"
    assert same_content(local, remote)  # same pixels, whatever the container
    assert remote["sample_sha256"] == local["sample_sha256"] == zipped["sample_sha256"]
    assert not same_content(remote, input_identity(f"{url}/after_cog.tif"))


def test_predict_cli_from_url_and_zip_then_resume(served, ckpt, tmp_path):
    root, url = served
    before = f"/vsicurl/{url}/before_cog.tif"  # '//' must survive the CLI
    after = f"/vsizip/{root / 'pair.zip'}/inner/after.tif"
    out = tmp_path / "out"
    _cli("predict", before, after, "-o", out, "-m", ckpt, "--tile-size", "32", "-q")
    run = json.loads((out / "run.json").read_text())
    assert run["inputs"]["before"] == before and run["inputs"]["after"] == after
    _cli("predict", f"{url}/before_cog.tif", f"{url}/after_cog.tif", "-o", tmp_path / "plain", "-m", ckpt,
         "--tile-size", "32", "-q")  # plain http:// URLs
    with rasterio.open(out / "change_probability.tif") as a, rasterio.open(tmp_path / "plain" /
                                                                            "change_probability.tif") as b:
        assert np.array_equal(a.read(), b.read())


def test_resume_manifest_of_remote_inputs(served, ckpt, tmp_path):
    from cdmap.checkpoint import load_checkpoint
    from cdmap.predict.options import PredictOptions
    from cdmap.predict.plan import make_plan

    root, url = served
    plan = make_plan(PredictOptions(tile_size=32), load_checkpoint(ckpt)).on_grid(64, 64)
    before, after = f"{url}/before_cog.tif", f"/vsizip/{root / 'pair.zip'}/inner/after.tif"
    m1 = plan.manifest(before, after)
    assert m1["before"] == before and m1["inputs"][0]["size"] == [64, 64, 3]
    assert plan.manifest(before, after) == m1  # stable: a resume matches
    other = plan.manifest(f"{url}/after_cog.tif", after)
    assert other["inputs"][0]["sample_sha256"] != m1["inputs"][0]["sample_sha256"]


def test_vectorize_tiles_and_evaluate_take_gdal_paths(served, tmp_path):
    root, url = served
    res = _cli("vectorize", f"/vsicurl/{url}/mask.tif", "-o", tmp_path / "v.gpkg")
    assert "polygon" in res and (tmp_path / "v.gpkg").exists()
    z = f"/vsizip/{root / 'pair.zip'}/inner"
    _cli("tiles", f"{z}/before.tif", f"{url}/after.tif", f"{z}/labels.tif", "-o", tmp_path / "data",
         "--tile-size", "32", "--split", "0.5,0.25,0.25", "-q")
    assert len(list((tmp_path / "data" / "train" / "label").iterdir())) == 2
    res = _cli("evaluate", "--scene", f"{z}/before.tif", f"{url}/after.tif", f"{url}/labels.tif",
               "--mask", f"/vsicurl/{url}/mask.tif", "--json")
    m = json.loads(res)["metrics"]
    assert m["f1"] == 1.0 and m["fp"] == 0  # the mask is the truth
