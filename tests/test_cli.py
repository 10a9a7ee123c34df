"""The CLI shell: fast help without torch, version, error mapping."""

from __future__ import annotations

import subprocess
import sys

from cdmap._version import __version__


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True)


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys; from cdmap.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "for c in ('predict', 'train', 'pretrain', 'vectorize', 'evaluate', 'tiles', 'info', 'calibrate', 'demo'):\n"
        "    try:\n        main([c, '--help'])\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('torch', 'rasterio', 'geopandas', 'shapely') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    for cmd in ("predict", "train", "pretrain", "vectorize", "evaluate", "tiles", "info", "calibrate", "demo"):
        assert cmd in proc.stdout


def test_version_and_module_entry_point():
    proc = _run("-m", "cdmap", "--version")
    assert proc.returncode == 0 and proc.stdout.splitlines()[0] == f"cdmap {__version__}"


def test_unknown_option_is_usage_error():
    proc = _run("-m", "cdmap", "predict", "--no-such-option")
    assert proc.returncode == 2


def test_lazy_public_api():
    import cdmap
    from cdmap.train import train

    assert callable(cdmap.predict_scene) and callable(train) and callable(cdmap.vectorize_raster)
    assert callable(cdmap.evaluate_scene) and cdmap.TrainConfig().epochs == 100
    assert cdmap.ModelConfig().backbone == "resnet18"
