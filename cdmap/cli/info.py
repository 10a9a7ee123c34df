"""``cdmap info`` and ``cdmap models``: what a checkpoint holds, which models come packaged."""

from __future__ import annotations

import json
from typing import Any

import typer

from cdmap.cli.app import app


def card_lines(card: dict[str, Any]) -> list[str]:
    """A model card as aligned ``key  value`` lines (empty for a checkpoint without a card)."""
    if not card:
        return []
    data = ", ".join(f"{d['set']} {d['pairs']} pairs ({d.get('gsd_m', '?')} m)" for d in card.get("training_data", []))
    lines = [
        f"model           {card.get('name', '?')}: {card.get('summary', '')}",
        f"bands           {card.get('band_order', ', '.join(card.get('bands', [])))}",
    ]
    if card.get("gsd_m"):
        from cdmap.predict.fit import GSD_FACTOR

        lo, hi = card["gsd_m"]
        lines.append(f"pixel size      trained on {lo:g}-{hi:g} m (warned beyond {lo / GSD_FACTOR:g}-"
                     f"{hi * GSD_FACTOR:g} m)")
    lines += [f"training data   {data}", f"licence         {card.get('licence', 'not stated')}"]
    for name, s in card.get("held_out", {}).items():
        lines.append(f"held out        {name}: F1 {s['f1']:.3f}, IoU {s['iou']:.3f}, precision {s['precision']:.3f}, "
                     f"recall {s['recall']:.3f} ({s['pairs']} pairs)")
    if card.get("recipe"):
        lines.append(f"recipe          {card['recipe']}")
    return lines


def _windows_line(summary: dict[str, Any]) -> str:
    """The overlap and margin predict uses at the checkpoint's tile size, and where they come from."""
    if summary.get("overlap") is None:
        return "overlap tile/8, margin overlap/4 (not calibrated: cdmap calibrate MODEL DATA measures them)"
    cal = summary.get("seam_calibration") or {}
    ratio = cal.get("seam_ratio")
    depth = (cal.get("edge") or {}).get("depth")
    return (f"overlap {summary['overlap']}, margin {summary['blend_margin']} (measured on {cal.get('scenes', '?')} "
            f"validation tiles: seam ratio {'n/a' if ratio is None else f'{ratio:.3f}'}, edge effect "
            f"{'?' if depth is None else depth} px)")


@app.command("info")
def info(
    checkpoint: str = typer.Argument(..., metavar="MODEL", help="A packaged model name or a checkpoint file (.pt)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Print a checkpoint's architecture, normalisation, tile size, threshold, metrics, provenance and card.

    Example: cdmap info runs/levir/best.pt     (or a packaged model: cdmap info fsgnet-rgb-v1)
    """
    from cdmap.checkpoint import load_checkpoint
    from cdmap.weights import model_path

    path = model_path(checkpoint)
    summary = load_checkpoint(path).summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    cfg = summary["model_config"]
    lines = [
        f"checkpoint      {path}",
        f"format version  {summary['format_version']}",
        f"architecture    FSG-Net, backbone {cfg['backbone']}, {cfg['in_channels']} bands, "
        f"{cfg['num_classes']} classes, {summary['parameters']:,} parameters",
        "normalisation   " + ", ".join(
            f"b{i + 1}: mean {m:.4g} std {s:.4g}"
            for i, (m, s) in enumerate(zip(summary["normalization"]["mean"], summary["normalization"]["std"],
                                           strict=True))
        ),
        f"tile size       {summary['tile_size']}",
        f"windows         {_windows_line(summary)}",
        f"threshold       {summary['threshold']:.4f}",
        "metrics         " + (", ".join(f"{k} {v:.4f}" for k, v in sorted(summary["metrics"].items())) or "none"),
        "provenance      " + ", ".join(f"{k} {v}" for k, v in sorted(summary["provenance"].items())),
        f"resumable       {'yes (training state included)' if summary['has_training_state'] else 'no'}",
        *card_lines(summary["card"]),
    ]
    typer.echo("\n".join(lines))


@app.command("models")
def models(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output (with the full cards)."),
) -> None:
    """List the models packaged with cdmap, with their cards; the default is used when --model is not given.

    Example: cdmap models
    """
    from cdmap.weights import packaged_models

    entries = packaged_models()
    if as_json:
        typer.echo(json.dumps(entries, indent=2, sort_keys=True))
        return
    if not entries:
        typer.echo("no packaged models installed")
        return
    blocks = []
    for e in entries:
        head = f"{e['name']}{'  (default)' if e['default'] else ''}  {e['bytes'] / 1e6:.1f} MB  {e['path']}"
        blocks.append("\n".join([head, *("  " + line for line in card_lines(e["card"]))]))
    typer.echo("\n\n".join(blocks))
