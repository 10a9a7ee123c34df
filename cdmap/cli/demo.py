"""``cdmap demo``: the synthetic end-to-end run of the README."""

from __future__ import annotations

from pathlib import Path

import typer

from cdmap.cli.app import app
from cdmap.cli.options import Device, Overwrite, Quiet


@app.command("demo")
def demo(
    output: Path = typer.Option(Path("demo_out"), "-o", "--output", help="Folder for data, model and outputs."),
    epochs: int = typer.Option(25, "--epochs", help="Training epochs."),
    tiles: int = typer.Option(48, "--tiles", help="Synthetic training tiles."),
    seed: int = typer.Option(0, "--seed", help="Seed of data and training."),
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Synthetic tiles -> train FSG-Net -> map a synthetic scene -> score it against the known truth.

    Example: cdmap demo -o demo_out
    """
    from cdmap.demo import run_demo

    run_demo(output, epochs=epochs, tiles=tiles, seed=seed, device=device, overwrite=overwrite, quiet=quiet)
