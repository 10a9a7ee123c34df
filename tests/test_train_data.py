"""Training data: discovery and its errors, labels, statistics, datasets, augmentations and the loss."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cdmap.data import PairFiles, discover, load_split, read_image, read_label, size_grouped_batches
from cdmap.errors import InputError, UsageError
from cdmap.train import augment as aug
from cdmap.train.data import EpochSampler, TrainTiles, compute_stats, sample_seed
from cdmap.train.losses import IGNORE_INDEX, CEDiceLoss, cross_entropy_loss, dice_loss

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

DRIVERS = {".png": "PNG", ".tif": "GTiff", ".jpg": "JPEG"}


def write(path: Path, arr: np.ndarray, nodata=None) -> Path:
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.ndim == 2:
        arr = arr[None]
    prof = dict(driver=DRIVERS[path.suffix], width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                dtype=arr.dtype)
    if nodata is not None:
        prof["nodata"] = nodata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path, "w", **prof) as dst:
            dst.write(arr)
    return path


def make_set(root: Path, names, *, size=(32, 32), bands=3, ext=".png", label_ext=".png", label_value=255,
             dtype=np.uint8, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    h, w = size
    for name in names:
        a = rng.integers(0, 200, (bands, h, w)).astype(dtype)
        b = rng.integers(0, 200, (bands, h, w)).astype(dtype)
        lab = np.zeros((h, w), np.uint8)
        lab[: h // 2, : w // 3] = label_value
        write(root / "A" / f"{name}{ext}", a)
        write(root / "B" / f"{name}{ext}", b)
        write(root / "label" / f"{name}{label_ext}", lab)
    return root


def make_split_set(root: Path, n_train=3, n_val=2, **kw) -> Path:
    make_set(root / "train", [f"t{i}" for i in range(n_train)], **kw)
    make_set(root / "val", [f"v{i}" for i in range(n_val)], seed=1, **kw)
    return root


# ----- discovery -----------------------------------------------------------------------------------------------
def test_discover_split_layout_tif_images_png_labels(tmp_path):
    root = make_split_set(tmp_path, ext=".tif", label_ext=".png", bands=4, dtype=np.uint16)
    s = discover(root)
    assert s.layout == "split"
    assert [p.name for p in s.train] == ["t0", "t1", "t2"]
    assert [p.name for p in s.val] == ["v0", "v1"]
    assert s.bands == 4
    assert s.train[0].label.suffix == ".png" and s.train[0].a.suffix == ".tif"
    assert (s.train[0].height, s.train[0].width) == (32, 32)


def test_discover_jpeg_images_and_float_geotiff(tmp_path):
    make_set(tmp_path / "j" / "train", ["x", "y"], ext=".jpg", label_ext=".png")
    make_set(tmp_path / "j" / "val", ["z"], ext=".jpg", label_ext=".png")
    s = discover(tmp_path / "j")
    assert s.bands == 3 and [p.a.suffix for p in s.train] == [".jpg", ".jpg"]
    make_set(tmp_path / "f" / "train", ["x"], ext=".tif", label_ext=".tif", dtype=np.float32, bands=5)
    make_set(tmp_path / "f" / "val", ["z"], ext=".tif", label_ext=".tif", dtype=np.float32, bands=5, label_value=1)
    s = discover(tmp_path / "f")
    assert s.bands == 5
    a, bad = read_image(s.train[0].a)
    assert a.dtype == np.float32 and a.shape == (5, 32, 32) and not bad.any()


def test_discover_flat_layout_split_is_deterministic(tmp_path):
    root = make_set(tmp_path, [f"p{i:02d}" for i in range(10)])
    s1 = discover(root, val_fraction=0.3, seed=5)
    s2 = discover(root, val_fraction=0.3, seed=5)
    assert s1.layout == "flat"
    assert [p.name for p in s1.val] == [p.name for p in s2.val]
    assert len(s1.val) == 3 and len(s1.train) == 7
    assert not {p.name for p in s1.val} & {p.name for p in s1.train}
    s3 = discover(root, seed=5)  # default fraction 0.1
    assert len(s3.val) == 1


def test_val_fraction_carves_from_train_when_no_val(tmp_path):
    make_set(tmp_path / "train", [f"t{i}" for i in range(5)])
    with pytest.raises(InputError, match="no val split"):
        discover(tmp_path)
    s = discover(tmp_path, val_fraction=0.4)
    assert len(s.val) == 2 and len(s.train) == 3


def test_missing_partners_listed_with_count(tmp_path):
    root = make_split_set(tmp_path)
    (root / "train" / "B" / "t1.png").unlink()
    (root / "train" / "label" / "t2.png").unlink()
    write(root / "train" / "label" / "extra.png", np.zeros((32, 32), np.uint8))
    with pytest.raises(InputError) as e:
        discover(root)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(root / "train"))
    assert "3 missing" in msg
    assert "t1: in A/label/ but missing in B/" in msg
    assert "t2: in A/B/ but missing in label/" in msg
    assert "extra: in label/ but missing in A/B/" in msg


def test_many_problems_show_first_few_and_count(tmp_path):
    root = make_split_set(tmp_path, n_train=8)
    for i in range(8):
        (root / "train" / "B" / f"t{i}.png").unlink()
    with pytest.raises(InputError, match=r"8 missing .*; and 3 more$"):
        discover(root)


def test_mismatched_sizes(tmp_path):
    root = make_split_set(tmp_path)
    write(root / "train" / "B" / "t0.png", np.zeros((3, 32, 31), np.uint8))
    write(root / "val" / "label" / "v1.png", np.zeros((30, 32), np.uint8))
    with pytest.raises(InputError, match=r"t0: sizes differ \(A 32x32, B 31x32, label 32x32"):
        discover(root)
    write(root / "train" / "B" / "t0.png", np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(InputError, match=r"v1: sizes differ"):
        discover(root)


def test_unreadable_file(tmp_path):
    root = make_split_set(tmp_path)
    (root / "train" / "A" / "t1.png").write_bytes(b"not a png at all")
    with pytest.raises(InputError, match=r"A/t1.png: unreadable"):
        discover(root)


def test_band_count_mismatch(tmp_path):
    # 4 data bands: a uint16 GeoTIFF (a 4-band PNG is RGBA, whose alpha band is a mask, not data)
    root = make_split_set(tmp_path)
    (root / "train" / "B" / "t0.png").unlink()
    write(root / "train" / "B" / "t0.tif", np.zeros((4, 32, 32), np.uint16))
    with pytest.raises(InputError, match=r"t0: band counts differ \(A 3, B 4\)"):
        discover(root)
    (root / "train" / "A" / "t0.png").unlink()
    write(root / "train" / "A" / "t0.tif", np.zeros((4, 32, 32), np.uint16))
    with pytest.raises(InputError, match=r"t0: 4 bands \(most images have 3\)"):
        discover(root)


@pytest.mark.parametrize(
    ("values", "ignore", "ok"),
    [
        ((0, 255), None, True),
        ((0, 1), None, True),
        ((0,), None, True),  # a tile with no change
        ((0, 1, 2), None, False),  # OSCD-style 1/2 coding
        ((0, 1, 255), None, False),
        ((0, 255, 7), 7, True),  # ignore index excluded
        ((0, 254, 255), None, False),  # JPEG-like noise
        ((0, 7), None, False),  # neither 0/1 nor 0/255
    ],
)
def test_label_values(tmp_path, values, ignore, ok):
    root = make_split_set(tmp_path)
    lab = np.zeros((32, 32), np.uint8)
    for i, v in enumerate(values):
        lab[i * 4 : i * 4 + 4] = v
    write(root / "val" / "label" / "v0.png", lab)
    if ok:
        discover(root, ignore_index=ignore)
    else:
        with pytest.raises(InputError, match=r"label/v0.png: label has values"):
            discover(root, ignore_index=ignore)


def test_float_label_non_integer_rejected(tmp_path):
    root = make_split_set(tmp_path, ext=".tif", label_ext=".tif")
    write(root / "train" / "label" / "t0.tif", np.full((32, 32), 0.5, np.float32))
    with pytest.raises(InputError, match="non-integer"):
        discover(root)


def test_empty_split_and_not_a_data_folder(tmp_path):
    root = make_split_set(tmp_path)
    for sub in ("A", "B", "label"):
        for f in (root / "val" / sub).iterdir():
            f.unlink()
    with pytest.raises(InputError, match="val split is empty"):
        discover(root)
    with pytest.raises(InputError, match="not a change-detection data folder"):
        discover(tmp_path / "train" / "A")
    with pytest.raises(InputError, match="data folder not found"):
        discover(tmp_path / "nope")
    (root / "val" / "label").rmdir()
    with pytest.raises(InputError, match=r"missing folder\(s\) label/"):
        discover(root)


def test_load_split_flat_and_named(tmp_path):
    root = make_split_set(tmp_path)
    assert [p.name for p in load_split(root, "val")] == ["v0", "v1"]
    assert [p.name for p in load_split(root / "train")] == ["t0", "t1", "t2"]  # flat folder used whole
    assert [p.name for p in load_split(root / "train", "train")] == ["t0", "t1", "t2"]  # it is that split
    with pytest.raises(UsageError, match="--split test: .* has no split folders"):
        load_split(root / "train", "test")  # not silently ignored
    with pytest.raises(InputError, match="no test split"):
        load_split(root, "test")


def test_oscd_coded_labels_need_label_values(tmp_path):
    """1 = no change / 2 = change: refused with a line naming --label-values, read right with it."""
    root = make_split_set(tmp_path)
    for split, names in (("train", ("t0", "t1", "t2")), ("val", ("v0", "v1"))):
        for i, n in enumerate(names):
            lab = np.ones((32, 32), np.uint8)  # tiles holding only 1 (no change) and tiles holding 1 and 2
            if i == 0:
                lab[:8] = 2
            write(root / split / "label" / f"{n}.png", lab)
    with pytest.raises(InputError, match=r"pass --label-values 1,2") as err:
        discover(root)
    assert "\n" not in str(err.value)
    s = discover(root, label_values=(1, 2))
    lab = read_label(s.train[0].label, label_values=(1, 2))
    assert lab[:8].min() == 1 and lab[8:].max() == 0
    with pytest.raises(InputError, match="outside --label-values 0,2"):
        discover(root, label_values=(0, 2))


def test_parse_label_values():
    from cdmap.labels import parse_label_values

    assert parse_label_values("1,2") == (1, 2) and parse_label_values(None) is None
    for bad in ("1", "1,1", "a,b", "1,2,3"):
        with pytest.raises(UsageError):
            parse_label_values(bad)


# ----- reading labels and images -------------------------------------------------------------------------------
def test_read_label_encodings(tmp_path):
    lab255 = np.array([[0, 255], [255, 0]], np.uint8)
    lab01 = (lab255 > 0).astype(np.uint8)
    rgb = np.stack([lab255, np.full_like(lab255, 9), np.zeros_like(lab255)])  # channel 0 is used
    a = read_label(write(tmp_path / "a.png", lab255))
    b = read_label(write(tmp_path / "b.png", lab01))
    c = read_label(write(tmp_path / "c.png", rgb))
    assert np.array_equal(a, lab01) and np.array_equal(b, lab01) and np.array_equal(c, lab01)
    ign = np.array([[0, 255], [7, 0]], np.uint8)
    d = read_label(write(tmp_path / "d.png", ign), ignore_index=7)
    assert d.tolist() == [[0, 1], [IGNORE_INDEX, 0]]


def test_read_image_nodata_and_nan(tmp_path):
    arr = np.array([[[0, 5], [0, 7]], [[0, 0], [3, 7]]], np.float32)
    arr[0, 1, 1] = np.nan
    data, invalid = read_image(write(tmp_path / "x.tif", arr, nodata=0))
    assert invalid.tolist() == [[True, False], [False, True]]  # all bands nodata; any band NaN
    assert not np.isnan(data).any()


# ----- one validity rule: tiles are invalid exactly where predict sees nodata ------------------------------------
INVALID = np.zeros((16, 16), bool)
INVALID[:5, :7] = True
INVALID[9, 12] = True


def _tile(path: Path, kind: str, invalid: np.ndarray) -> Path:
    """A 16x16 GeoTIFF whose pixels are invalid at ``invalid`` through ``kind``: an internal mask band, an alpha
    band (RGBA), a nodata value (in every band; one band alone at (12, 3) stays valid) or NaN (in one band)."""
    import rasterio
    from rasterio.transform import from_origin

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    dtype = np.float32 if kind == "nan" else np.uint16 if kind == "nodata" else np.uint8
    data = rng.integers(1, 200, (3, 16, 16)).astype(dtype)
    prof = dict(driver="GTiff", width=16, height=16, count=3, dtype=dtype, crs="EPSG:32633",
                transform=from_origin(500000.0, 4000000.0, 0.5, 0.5))
    if kind == "nodata":
        prof["nodata"] = 0
        data[:, invalid] = 0
        data[1, 12, 3] = 0
    elif kind == "nan":
        data[2, invalid] = np.nan
    elif kind == "alpha":
        alpha = np.where(invalid, 0, 255).astype(np.uint8)[None]
        data = np.concatenate([data, alpha])
        prof.update(count=4, photometric="RGB", alpha="YES")
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **prof) as dst:
        dst.write(data)
        if kind == "mask":
            dst.write_mask(np.where(invalid, 0, 255).astype(np.uint8))
    return path


@pytest.mark.parametrize("kind", ["mask", "alpha", "nodata", "nan"])
def test_tile_validity_is_predicts(tmp_path, kind):
    import rasterio

    from cdmap.raster.pair import open_pair
    from cdmap.train.tiles import _all_nodata

    path = _tile(tmp_path / "A" / "t.tif", kind, INVALID)
    if kind == "alpha":
        with rasterio.open(path) as src:
            assert src.colorinterp[3] == rasterio.enums.ColorInterp.alpha
    data, invalid = read_image(path)
    assert invalid.tolist() == INVALID.tolist()
    a, _, valid = open_pair(path, path).read(rasterio.windows.Window(0, 0, 16, 16))
    assert np.array_equal(invalid, ~valid) and np.array_equal(data, a)  # the alpha band is a mask, not data
    assert data.shape == (3, 16, 16)

    # training and evaluation labels are IGNORE there, and only there
    _tile(tmp_path / "B" / "t.tif", kind, np.zeros_like(INVALID))
    write(tmp_path / "label" / "t.png", np.zeros((16, 16), np.uint8))
    (pair,) = load_split(tmp_path)
    assert pair.bands == 3
    _, _, lab = TrainTiles([pair], [100.0] * 3, [50.0] * 3, crop_size=16)[(0, 0)]
    assert (lab.numpy() == IGNORE_INDEX).tolist() == INVALID.tolist()
    from cdmap.data import EvalTiles

    ea, _, elab, _ = EvalTiles([pair], [100.0] * 3, [50.0] * 3)[0]
    assert torch.equal(elab, lab) and (ea[:, torch.from_numpy(INVALID)] == 0).all()

    # cdmap tiles skips a window only when nothing in it is valid, by the same rule
    full = _tile(tmp_path / "full.tif", kind, np.ones_like(INVALID))
    window = rasterio.windows.Window(0, 0, 16, 16)
    with rasterio.open(path) as part, rasterio.open(full) as none:
        assert not _all_nodata(part, window) and _all_nodata(none, window)


def test_alpha_band_is_data_when_the_model_expects_every_band(tmp_path):
    import rasterio

    from cdmap.raster.pair import open_pair

    path = _tile(tmp_path / "A" / "t.tif", "alpha", INVALID)
    data, invalid = read_image(path, bands=4)
    a, _, valid = open_pair(path, path, expected_bands=4).read(rasterio.windows.Window(0, 0, 16, 16))
    assert data.shape == (4, 16, 16) and not invalid.any()
    assert np.array_equal(invalid, ~valid) and np.array_equal(data, a)
    _tile(tmp_path / "B" / "t.tif", "alpha", INVALID)
    write(tmp_path / "label" / "t.png", np.zeros((16, 16), np.uint8))
    assert load_split(tmp_path, expected_bands=4)[0].bands == 4 and load_split(tmp_path)[0].bands == 3


# ----- statistics ----------------------------------------------------------------------------------------------
def test_compute_stats_matches_numpy_and_excludes_nodata(tmp_path):
    rng = np.random.default_rng(3)
    pairs, arrays = [], []
    for i in range(3):
        a = rng.integers(1, 60000, (4, 16 + i, 20)).astype(np.uint16)
        b = rng.integers(1, 60000, (4, 16 + i, 20)).astype(np.uint16)
        a[:, 0, :5] = 0  # nodata in all bands: excluded
        b[3] = 1234  # nearly constant band still fine
        pa = write(tmp_path / f"a{i}.tif", a, nodata=0)
        pb = write(tmp_path / f"b{i}.tif", b, nodata=0)
        pairs.append(PairFiles(f"p{i}", pa, pb, pa))
        arrays += [a[:, 1:, :].reshape(4, -1), a[:, 0, 5:].reshape(4, -1), b.reshape(4, -1)]
    allv = np.concatenate(arrays, axis=1).astype(np.float64)
    mean, std = compute_stats(pairs, workers=2)
    np.testing.assert_allclose(mean, allv.mean(1), rtol=1e-10)
    np.testing.assert_allclose(std, allv.std(1), rtol=1e-8)
    const = write(tmp_path / "c.tif", np.full((2, 8, 8), 5, np.uint8))
    m, s = compute_stats([PairFiles("c", const, const, const)])
    assert m == [5.0, 5.0] and s == [1.0, 1.0]


# ----- datasets and sampler ------------------------------------------------------------------------------------
def _pairs(root: Path):
    return discover(root).train


def test_train_tiles_crops_pads_and_is_deterministic(tmp_path):
    root = make_split_set(tmp_path, size=(40, 48))
    pairs = _pairs(root)
    ds = TrainTiles(pairs, [100.0] * 3, [50.0] * 3, crop_size=32, seed=1, augment=aug.AugmentConfig())
    a, b, lab = ds[(0, 1)]
    assert a.shape == (3, 32, 32) and b.shape == (3, 32, 32) and lab.shape == (32, 32)
    assert a.dtype == torch.float32 and lab.dtype == torch.uint8
    a2, b2, lab2 = ds[(0, 1)]
    assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(lab, lab2)
    a3, _, _ = ds[(1, 1)]
    assert not torch.equal(a, a3)
    big = TrainTiles(pairs, [100.0] * 3, [50.0] * 3, crop_size=64, seed=1)
    a4, _, lab4 = big[(0, 0)]
    assert a4.shape == (3, 64, 64) and lab4.shape == (64, 64)
    # reflection: row 40 mirrors row 38, column 48 mirrors column 46
    assert torch.equal(a4[:, 40], a4[:, 38]) and torch.equal(a4[:, :, 48], a4[:, :, 46])
    assert set(torch.unique(lab4).tolist()) <= {0, 1}
    raw, _ = read_image(pairs[0].a)
    np.testing.assert_allclose(a4[:, :40, :48].numpy(), (raw - 100.0) / 50.0, rtol=1e-6)


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    ds = list(range(10))

    def order(seed, epoch, rank=0, world=1):
        s = EpochSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert all(e == 3 for e, _ in order(1, 3))
    both = [i for _, i in order(1, 2, 0, 2)] + [i for _, i in order(1, 2, 1, 2)]
    assert sorted(both) == list(range(10))
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3) != sample_seed(1, 2, 4)


def test_size_grouped_batches():
    ps = [PairFiles(str(i), Path("a"), Path("b"), Path("l"), h, 10) for i, h in enumerate([8, 9, 8, 8, 9])]
    assert size_grouped_batches(ps, 2) == [[0, 2], [3], [1, 4]]
    assert size_grouped_batches(ps, 2, rank=1, world_size=2) == [[3]]


# ----- augmentations keep A, B and label aligned ----------------------------------------------------------------
def _coded(h=48, w=40):
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    a = torch.stack([rows, cols, torch.ones_like(rows)])  # channel 2: in-bounds weight after resampling
    b = a + 1000.0
    label = _truth(rows, cols)
    return a, b, label


def _truth(r, c):
    r = torch.round(r).long()
    c = torch.round(c).long()
    return (((r // 8) + (c // 8)) % 2).to(torch.uint8)


def _check_aligned(a, b, label, exact: bool, min_agree: float = 0.995):
    h, w = label.shape
    valid = label != IGNORE_INDEX
    r, c = a[0], a[1]
    interior = valid & ((a[2] - 1).abs() < 1e-4)  # not mixed with the zero fill
    if exact:
        assert valid.all()
        assert torch.equal(label, _truth(r, c))
        assert torch.allclose((b - a).abs(), torch.full_like(a, 1000.0))
        return
    assert interior.sum() > 0.15 * h * w
    # a source position exactly half-way between two pixels may go either way in nearest sampling
    tie = ((r - r.floor() - 0.5).abs() < 1e-3) | ((c - c.floor() - 0.5).abs() < 1e-3)
    interior &= ~tie
    agree = (label[interior] == _truth(r[interior], c[interior])).float().mean().item()
    assert agree >= min_agree
    diff = (b - a)[:, interior].abs()
    assert torch.allclose(diff, torch.full_like(diff, 1000.0), atol=0.05)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot90_aligned(k):
    a, b, lab = aug.rot90(*_coded(), k)
    _check_aligned(a, b, lab, exact=True)


def test_flips_aligned():
    _check_aligned(*aug.hflip(*_coded()), exact=True)
    _check_aligned(*aug.vflip(*_coded()), exact=True)
    a, b, lab = aug.hflip(*_coded())
    assert a[1, 0, 0] == 39 and a[0, 0, 0] == 0
    assert a.shape == (3, 48, 40)


@pytest.mark.parametrize("deg", [-15.0, -7.3, 4.0, 15.0])
def test_rotation_aligned_and_fill_is_ignored(deg):
    a, b, lab = aug.rotate(*_coded(), deg)
    _check_aligned(a, b, lab, exact=False)
    corners = [lab[0, 0], lab[0, -1], lab[-1, 0], lab[-1, -1]]
    assert all(int(v) == IGNORE_INDEX for v in corners)
    assert a[:, 0, 0].abs().max() < 1.0  # images filled with 0 there
    assert a[2].min() < 0.5  # and there is fill
    assert set(torch.unique(lab).tolist()) <= {0, 1, IGNORE_INDEX}


@pytest.mark.parametrize("scale", [0.5, 0.77, 1.0, 1.31, 1.5])
def test_scale_crop_aligned(scale):
    gen = torch.Generator().manual_seed(0)
    a, b, lab = aug.scale_crop(*_coded(), scale, gen)
    assert a.shape == (3, 48, 40) and lab.shape == (48, 40)
    _check_aligned(a, b, lab, exact=scale == 1.0)
    if scale < 1:
        assert int(lab[-1, -1]) == IGNORE_INDEX  # padding is ignored


def test_full_chain_aligned_over_many_seeds():
    # Chained resampling (rotation then scale) rounds the label twice (nearest), so a label may shift by up to
    # ~1 px at a block edge; away from block edges label and image must agree everywhere.
    swapped = 0
    for seed in range(30):
        gen = torch.Generator().manual_seed(seed)
        a, b, lab = aug.augment(*_coded(), gen)
        if (b - a).mean() < 0:  # dates swapped: the coordinates are in B
            swapped += 1
            a, b = b, a
        r, c = a[0], a[1]
        inside = (lab != IGNORE_INDEX) & ((a[2] - 1).abs() < 1e-4)
        edge_r = ((r + 0.5) - 8 * torch.round((r + 0.5) / 8)).abs()
        edge_c = ((c + 0.5) - 8 * torch.round((c + 0.5) / 8)).abs()
        far = inside & (edge_r > 1.0) & (edge_c > 1.0)
        assert far.sum() > 100, seed
        assert torch.equal(lab[far], _truth(r[far], c[far])), seed
        diff = (b - a)[:, inside].abs()
        assert torch.allclose(diff, torch.full_like(diff, 1000.0), atol=0.05)
    assert 0 < swapped < 30


def test_swap_swaps_only_dates():
    cfg = aug.AugmentConfig(hflip=0, vflip=0, rot90=0, rotate=0, scale=0, swap=1.0)
    a0, b0, l0 = _coded()
    a, b, lab = aug.augment(a0, b0, l0, torch.Generator().manual_seed(0), cfg)
    assert torch.equal(a, b0) and torch.equal(b, a0) and torch.equal(lab, l0)


# ----- loss ----------------------------------------------------------------------------------------------------
def test_loss_hand_case_uniform_logits():
    logits = torch.zeros(1, 2, 2, 2)
    target = torch.ones(1, 2, 2, dtype=torch.long)
    # CE = ln 2; dice_change = 2*2/(2+4) = 2/3, dice_background = 0 -> dice loss 1 - 1/3 = 2/3
    assert cross_entropy_loss(logits, target).item() == pytest.approx(math.log(2))
    assert dice_loss(logits, target).item() == pytest.approx(2 / 3, abs=1e-6)
    assert CEDiceLoss()(logits, target).item() == pytest.approx(math.log(2) + 2 / 3, abs=1e-6)


def test_loss_hand_case_batch_global_dice():
    # image 1: p(change)=0.8 on a changed pixel; image 2: p(change)=0.2 on an unchanged pixel
    p = torch.tensor([0.8, 0.2])
    logits = torch.stack([torch.zeros(2), torch.log(p / (1 - p))], 1).reshape(2, 2, 1, 1)
    target = torch.tensor([1, 0]).reshape(2, 1, 1)
    d1 = 2 * 0.8 / (0.8 + 0.2 + 1)  # change: sum p = 1.0, sum y = 1
    d0 = 2 * 0.8 / (0.2 + 0.8 + 1)  # background: p0 = 0.2, 0.8
    assert dice_loss(logits, target).item() == pytest.approx(1 - (d0 + d1) / 2, abs=1e-6)
    assert cross_entropy_loss(logits, target).item() == pytest.approx(-math.log(0.8), abs=1e-6)


def test_loss_ignores_ignore_index():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 4, 4)
    target = torch.randint(0, 2, (1, 4, 4))
    masked = target.clone()
    masked[0, :2] = IGNORE_INDEX
    wild = logits.clone()
    wild[:, :, :2] = torch.randn(1, 2, 2, 4) * 50  # whatever is predicted there must not matter
    loss = CEDiceLoss()
    a = loss(logits, masked)
    b = loss(wild, masked)
    c = loss(logits[:, :, 2:], target[:, 2:])
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    assert a.item() == pytest.approx(c.item(), abs=1e-6)
    all_ignored = torch.full_like(target, IGNORE_INDEX)
    val = loss(logits.requires_grad_(), all_ignored)
    assert math.isfinite(val.item())
    val.backward()


def test_loss_perfect_prediction_near_zero():
    target = torch.tensor([[[0, 1], [1, 0]]])
    logits = torch.stack([(1 - target) * 30.0, target * 30.0], 1).float()
    assert CEDiceLoss()(logits, target).item() < 1e-6


# ----- cdmap tiles ---------------------------------------------------------------------------------------------
def _scene(tmp_path, make_pair, make_geotiff, nodata_block=False):
    import geopandas as gpd
    import rasterio
    from rasterio.features import shapes
    from shapely.geometry import shape

    before, after, truth = make_pair(tmp_path, height=150, width=200, nodata=0 if nodata_block else None)
    if nodata_block:  # first 64x64 tile entirely nodata in AFTER
        with rasterio.open(after, "r+") as dst:
            arr = dst.read()
            arr[:, :64, :64] = 0
            dst.write(arr)
    with rasterio.open(before) as src:
        transform, crs = src.transform, src.crs
    geoms = [shape(g) for g, v in shapes(truth, mask=truth > 0, transform=transform) if v == 1]
    gpkg = tmp_path / "changes.gpkg"
    gpd.GeoDataFrame(geometry=geoms, crs=crs).to_crs("EPSG:4326").to_file(gpkg)  # reprojected back by tiles
    lab_tif = make_geotiff(tmp_path / "truth.tif", truth * 255)
    return before, after, truth, gpkg, lab_tif, transform


def test_tiles_from_polygons_cli(tmp_path, make_pair, make_geotiff):
    import rasterio

    from cdmap.cli.app import main

    before, after, truth, gpkg, lab_tif, transform = _scene(tmp_path, make_pair, make_geotiff)
    out = tmp_path / "DATA"
    main(["tiles", str(before), str(after), str(gpkg), "-o", str(out), "--tile-size", "64", "--split",
          "0.6,0.2,0.2", "--seed", "3", "--quiet"])
    manifest = json.loads((out / "tiles.json").read_text())
    assert manifest["counts"] == {"train": 8, "val": 2, "test": 2}  # 3 x 4 = 12 tiles; train takes the rest
    names = {s: sorted(p.stem for p in (out / s / "A").iterdir()) for s in ("train", "val", "test")}
    assert sum(len(v) for v in names.values()) == 12
    # every tile is a georeferenced window of the scene; labels match the rasterised polygons (0/255)
    for split, stems in names.items():
        for stem in stems:
            row, col = (int(x) for x in stem.split("_")[-2:])
            with rasterio.open(out / split / "label" / f"{stem}.tif") as src:
                lab = src.read(1)
                assert src.transform.almost_equals(transform @ rasterio.Affine.translation(col, row))
            with rasterio.open(out / split / "A" / f"{stem}.tif") as src, rasterio.open(before) as full:
                win = rasterio.windows.Window(col, row, src.width, src.height)
                assert np.array_equal(src.read(), full.read(window=win))
            h, w = lab.shape
            expect = truth[row : row + h, col : col + w] * 255
            assert (lab != expect).mean() < 0.01  # reprojection round trip of polygon edges
    assert (1 <= min(len(v) for v in names.values()))
    s = discover(out)
    assert len(s.train) == 8 and len(s.val) == 2
    # deterministic; refuses to overwrite; a raster label gives the same split and labels
    with pytest.raises(SystemExit):
        main(["tiles", str(before), str(after), str(gpkg), "-o", str(out), "--tile-size", "64"])
    out2 = tmp_path / "DATA2"
    from cdmap.train.tiles import make_tiles

    r = make_tiles(before, after, lab_tif, out2, tile_size=64, split="0.6,0.2,0.2", seed=3)
    assert r.names == {k: sorted(v) for k, v in names.items()}
    for stem in names["train"]:
        with rasterio.open(out2 / "train" / "label" / f"{stem}.tif") as src:
            row, col = (int(x) for x in stem.split("_")[-2:])
            h, w = src.height, src.width
            assert np.array_equal(src.read(1), truth[row : row + h, col : col + w] * 255)
    r4 = make_tiles(before, after, lab_tif, tmp_path / "DATA4", tile_size=64, split="0.6,0.2,0.2", seed=4)
    assert r4.names != r.names


def test_tiles_skip_nodata_and_errors(tmp_path, make_pair, make_geotiff):
    from cdmap.errors import IncompatibleInputsError, UsageError
    from cdmap.train.tiles import make_tiles

    before, after, truth, gpkg, lab_tif, _ = _scene(tmp_path, make_pair, make_geotiff, nodata_block=True)
    r = make_tiles(before, after, gpkg, tmp_path / "D", tile_size=64, split=(1.0, 0.0, 0.0), fmt="png")
    assert r.skipped_nodata == 1 and r.counts == {"train": 11, "val": 0, "test": 0}
    assert not (tmp_path / "D" / "train" / "A" / "before_00000_00000.png").exists()
    with pytest.raises(UsageError, match="--split"):
        make_tiles(before, after, gpkg, tmp_path / "E", split="0.5,0.2")
    small = make_geotiff(tmp_path / "small.tif", np.zeros((10, 10), np.uint8))
    with pytest.raises(IncompatibleInputsError, match="is not on the grid of"):
        make_tiles(before, after, small, tmp_path / "F", tile_size=64)


# ----- real data (skipped when ../shared/data is absent) ---------------------------------------------------------
@pytest.mark.realdata
def test_real_levir_samples_discover_and_oscd_label_trap(shared_data, tmp_path):
    import rasterio

    from cdmap.labels import distinct_values, label_problem

    s = discover(shared_data / "levircd_bitcd_samples", val_fraction=0.2, seed=0)  # flat A/B/label
    assert len(s.train) + len(s.val) == 11 and s.bands == 3
    assert all((p.height, p.width) == (256, 256) for p in s.train)
    with rasterio.open(shared_data / "oscd_sentinel2" / "bercy" / "cm" / "bercy-cm.tif") as src:
        raw = src.read(1)
    why = label_problem(distinct_values(raw))  # OSCD: 1 = no change, 2 = change
    assert "values {1, 2}" in why and "--label-values 1,2" in why
    assert label_problem(distinct_values(raw), (1, 2)) is None


def test_photometric_jitter_is_per_date_and_off_by_default():
    a, b, lab = _coded()
    cfg = aug.AugmentConfig(hflip=0, vflip=0, rot90=0, rotate=0, scale=0, swap=0, photometric=1.0)
    gen = torch.Generator().manual_seed(3)
    ja, jb, jl = aug.augment(a, b, lab, gen, cfg)
    assert torch.equal(jl, lab)  # the ground did not change
    # each date: x * gain + offset (+ per-band offset) with its own draw, within the configured ranges
    gains = []
    for x, y in ((a, ja), (b, jb)):
        g = (y[0, 1:, 0] - y[0, :-1, 0]) / (x[0, 1:, 0] - x[0, :-1, 0])  # d(out)/d(in) along rows
        assert torch.allclose(g, g[0].expand_as(g), atol=1e-4)
        gains.append(float(g[0]))
        assert 0.8 <= gains[-1] <= 1.2 and not torch.equal(x, y)
    assert gains[0] != pytest.approx(gains[1])
    # off (the default, the reference recipe): nothing changes and no random numbers are drawn
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    off = aug.augment(a, b, lab, g1, aug.AugmentConfig())
    assert torch.equal(off[0], aug.augment(a, b, lab, g2, aug.AugmentConfig(photometric=0.0))[0])
    assert torch.rand((), generator=g1) == torch.rand((), generator=g2)
