"""What ``--help``, ``--version`` and ``cdmap doctor`` show: flags as flags, types in words, choices, examples."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("predict", "vectorize", "train", "evaluate", "tiles", "info", "models", "demo", "doctor")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "cdmap", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def _help_texts() -> dict[str, str]:
    code = ("import sys\nfrom cdmap.cli import main\nfor c in sys.argv[1:]:\n    print('@@', c)\n"
            "    try:\n        main([c, '--help'] if c != '-' else ['--help'])\n    except SystemExit:\n        pass\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-c", code, "-", *COMMANDS], capture_output=True, text=True, env=env,
                         timeout=120).stdout
    texts = {}
    for block in out.split("@@ ")[1:]:
        name, _, text = block.partition("\n")
        texts[name] = text
    return texts


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return _help_texts()


def test_no_python_types_and_an_example_everywhere(helps):
    assert set(helps) == {"-", *COMMANDS}
    for name, text in helps.items():
        for raw in ("<bool>", "<list[", "<Path", "<path>", "<int>", "<float>", "<str>", "{BEFORE}"):
            assert raw not in text, f"{name}: {raw}"
        if name != "-":
            assert "Example: cdmap " in text, name


def test_flags_are_flags_and_choices_are_listed(helps):
    predict = helps["predict"]
    for flag in ("--cog", "--overwrite", "--resume", "--no-report", "--json"):
        line = next(li for li in predict.splitlines() if f" {flag} " in li)
        assert "TEXT" not in line and "bool" not in line, line
    for choices in ("auto|fp32|bf16|fp16", "uint8|float32", "auto|strict", "gpkg|geojson|fgb|shp|parquet",
                    "auto|cpu|cuda[:N]", "nearest|bilinear|cubic"):
        assert choices in predict, choices
    assert "INTEGER" in predict and "NUMBER" in predict
    assert "Usage: cdmap predict [OPTIONS] [BEFORE] [AFTER]" in predict  # optional: --pairs replaces them
    assert "BEFORE AFTER LABELS" in helps["evaluate"] and "tif|png" in helps["tiles"]
    assert "resnet18, resnet34" in helps["train"] and "[DATA]..." in helps["train"]
    assert "--install-completion" in helps["-"]


def test_resampling_choices_are_the_warpers():
    from cdmap.cli.options import RESAMPLINGS
    from cdmap.raster.pair import WARP_RESAMPLINGS

    assert RESAMPLINGS == WARP_RESAMPLINGS


def test_version_names_torch_gdal_and_device():
    proc = _cli("--version")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[0].startswith("cdmap ")
    assert lines[1].startswith("torch ") and "GDAL" in lines[2] and lines[3].startswith("device ")


def test_doctor_table():
    proc = _cli("doctor")
    assert proc.returncode == 0, proc.stderr
    names = [li.split()[0] for li in proc.stdout.splitlines()[2:]]
    for row in ("torch", "CUDA", "bf16", "rasterio", "matplotlib", "pyarrow", "temp"):
        assert row in names, row


def test_rasterio_warnings_become_one_log_line(capsys, monkeypatch):
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    from cdmap.cli import logs

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    logs.install()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = logs.show_warning
        warnings.warn("Dataset has no geotransform,\n gcps, or rpcs.", NotGeoreferencedWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err == "cdmap: warning: NotGeoreferencedWarning: Dataset has no geotransform, gcps, or rpcs.\n"
