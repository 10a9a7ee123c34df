"""``cdmap calibrate``: measure a checkpoint's window overlap and blend margin on labelled tiles."""

from __future__ import annotations

from pathlib import Path

import typer

from cdmap.cli.app import app
from cdmap.cli.options import BatchSize, Device, Precision


@app.command("calibrate")
def calibrate(
    checkpoint: str = typer.Argument(..., metavar="MODEL", help="A checkpoint file (.pt), updated in place unless "
                                     "--output; or a packaged model name, with --output."),
    data: Path = typer.Argument(..., help="Labelled tiles (DATA/{train,val,test}/{A,B,label} or DATA/{A,B,label})."),
    split: str = typer.Option("val", "--split", help="Split of DATA to measure on (a flat folder is used whole)."),
    limit: int = typer.Option(8, "--limit", help="At most this many pairs of the split."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the calibrated checkpoint here."),
    device: Device = "auto",
    precision: Precision = "auto",
    batch_size: BatchSize = 4,
) -> None:
    """Store the overlap and margin that keep the seam ratio <= 1.1 in the checkpoint (predict uses them).

    Example: cdmap calibrate runs/levir/best.pt data/levir     (cdmap train does this itself when it ends)
    """
    from cdmap.calibrate import calibrate_checkpoint

    written, cal = calibrate_checkpoint(checkpoint, data, split, output, device=device, precision=precision,
                                        batch_size=batch_size, limit=limit)
    zero = cal.candidates[0]["seam_ratio"]
    shown = "n/a" if cal.seam_ratio is None else f"{cal.seam_ratio:.3f}"
    typer.echo(f"cdmap: overlap {cal.overlap}, margin {cal.margin} at tile {cal.tile}: seam ratio {shown} "
               f"(overlap 0: {'n/a' if zero is None else f'{zero:.3f}'}; edge effect "
               f"{cal.edge['depth'] if cal.edge and cal.edge['depth'] is not None else '?'} px) -> {written}")
