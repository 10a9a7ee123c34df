"""``cdmap calibrate``: measure a checkpoint's window overlap and blend margin on labelled tiles."""

from __future__ import annotations

from pathlib import Path

import typer

from cdmap.cli.app import app


@app.command("calibrate")
def calibrate(
    checkpoint: Path = typer.Argument(..., help="A cdmap checkpoint (.pt); updated in place unless --output."),
    data: Path = typer.Argument(..., help="Labelled tiles (DATA/{train,val,test}/{A,B,label} or DATA/{A,B,label})."),
    split: str = typer.Option("val", "--split", help="Split of DATA to measure on (a flat folder is used whole)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the calibrated checkpoint here."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward pass."),
) -> None:
    """Store the overlap and margin that keep the seam ratio <= 1.1 in the checkpoint (predict uses them)."""
    from cdmap.calibrate import calibrate_checkpoint

    written, cal = calibrate_checkpoint(checkpoint, data, split, output, device=device, batch_size=batch_size)
    zero = cal.candidates[0]["seam_ratio"]
    typer.echo(f"cdmap: overlap {cal.overlap}, margin {cal.margin} at tile {cal.tile}: seam ratio "
               f"{cal.seam_ratio:.3f} (overlap 0: {zero:.3f}) -> {written}" if cal.seam_ratio is not None and
               zero is not None else f"cdmap: overlap {cal.overlap}, margin {cal.margin} -> {written}")
