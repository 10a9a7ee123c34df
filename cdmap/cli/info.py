"""``cdmap info``: what a checkpoint holds."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cdmap.cli.app import app


@app.command("info")
def info(
    checkpoint: Path = typer.Argument(..., help="A cdmap checkpoint (.pt)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Print a checkpoint's architecture, normalisation, tile size, threshold, metrics and provenance.

    Example: cdmap info runs/levir/best.pt
    """
    from cdmap.checkpoint import load_checkpoint

    summary = load_checkpoint(checkpoint).summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    cfg = summary["model_config"]
    lines = [
        f"checkpoint      {checkpoint}",
        f"format version  {summary['format_version']}",
        f"architecture    FSG-Net, backbone {cfg['backbone']}, {cfg['in_channels']} bands, "
        f"{cfg['num_classes']} classes, {summary['parameters']:,} parameters",
        "normalisation   " + ", ".join(
            f"b{i + 1}: mean {m:.4g} std {s:.4g}"
            for i, (m, s) in enumerate(zip(summary["normalization"]["mean"], summary["normalization"]["std"],
                                           strict=True))
        ),
        f"tile size       {summary['tile_size']}",
        f"threshold       {summary['threshold']:.4f}",
        "metrics         " + (", ".join(f"{k} {v:.4f}" for k, v in sorted(summary["metrics"].items())) or "none"),
        "provenance      " + ", ".join(f"{k} {v}" for k, v in sorted(summary["provenance"].items())),
        f"resumable       {'yes (training state included)' if summary['has_training_state'] else 'no'}",
    ]
    typer.echo("\n".join(lines))
