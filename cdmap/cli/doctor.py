"""``cdmap doctor``: a thin layer over :func:`cdmap.doctor.check_installation`."""

from __future__ import annotations

import typer

from cdmap.cli.app import app
from cdmap.cli.options import JsonOut


@app.command("doctor")
def doctor(json_out: JsonOut = False) -> None:
    """Check the installation: torch and CUDA, bf16, GDAL drivers, optional packages, free temp space.

    Exit status 1 when a required part is broken (a FAIL row); notes are informational.

    Example: cdmap doctor
    """
    from cdmap.doctor import check_installation, format_table

    rows = check_installation()
    if json_out:
        import json
        from dataclasses import asdict

        typer.echo(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        typer.echo(format_table(rows))
    if any(r.status == "FAIL" for r in rows):
        raise typer.Exit(1)
