"""The Typer application and the error-to-exit-code mapping shared by every command.

Command modules import the library lazily inside each command so that ``cdmap --help`` never imports torch.
"""

from __future__ import annotations

import os
import sys

import typer

from cdmap._version import __version__

app = typer.Typer(
    name="cdmap",
    help="Map change between two co-registered GeoTIFF scenes with FSG-Net.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"verbose": False}


def verbose() -> bool:
    """True when ``--verbose`` was given (tracebacks are shown)."""
    return _state["verbose"]


def _version_callback(value: bool) -> None:
    if value:
        try:
            from cdmap.doctor import versions

            lines = versions()
        except ImportError as exc:  # a broken installation still says which cdmap it is
            lines = [f"cdmap {__version__}", f"({exc}; run cdmap doctor)"]
        typer.echo("\n".join(lines))
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True,
        help="Print the versions of cdmap, torch, rasterio/GDAL and the device found, and exit."
    ),
    verbose_flag: bool = typer.Option(False, "--verbose", "-v", help="Show debug messages and tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print warnings and errors only."),
) -> None:
    """cdmap: change maps, masks and polygons from two GeoTIFF scenes."""
    from cdmap.allocator import tune_allocator
    from cdmap.cli import logs

    _state["verbose"] = verbose_flag or _state["verbose"]
    if quiet:
        logs.set_quiet()
    tune_allocator()  # large tensors reuse the pages of the previous batch (cdmap/allocator.py)


def fail(message: str, code: int) -> None:
    """Print one error line on stderr and exit with ``code``."""
    typer.echo(f"cdmap: error: {message}", err=True)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app and turns exceptions into one line and an exit code."""
    try:  # newer typer carries its own copy of click; its exceptions are the ones raised
        from typer._click.exceptions import ClickException
    except ImportError:  # pragma: no cover - typer built on the click package
        from click import ClickException

    from cdmap import errors
    from cdmap.cli import logs

    args = list(sys.argv[1:] if argv is None else argv)
    _state["verbose"] = False
    if "--verbose" in args or "-v" in args or os.environ.get("CDMAP_VERBOSE"):
        _state["verbose"] = True
    logs.install(verbose=_state["verbose"])
    _register_commands()
    from cdmap import process
    from cdmap.cli.help import readable_help

    command = readable_help(typer.main.get_command(app))
    try:
        with process.SignalGuard():  # the one signal path of every command: SIGINT 130, SIGTERM 143
            process.fault_point("start")
            command.main(args=args, prog_name="cdmap", standalone_mode=False)
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        fail("interrupted by SIGINT", errors.EXIT_SIGINT)
    except ClickException as exc:
        fail(_click_message(exc), exc.exit_code)
    except errors.CdmapError as exc:
        if _state["verbose"]:
            import traceback

            traceback.print_exc()
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted by SIGINT", errors.EXIT_SIGINT)
    except Exception as exc:  # noqa: BLE001 - last-resort mapping to exit code 1
        if _state["verbose"]:
            import traceback

            traceback.print_exc()
        fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --verbose for a traceback)", 1)


def _click_message(exc: Exception) -> str:
    """A click usage error on one line, with the command's help hint (click's usage block left out)."""
    text = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
    ctx = getattr(exc, "ctx", None)
    if ctx is not None and getattr(ctx, "command_path", None):
        text += f" (try '{ctx.command_path} --help')"
    return text


_registered = False


def _register_commands() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    import importlib

    for name in ("info", "predict", "vectorize", "train", "pretrain", "calibrate", "demo", "doctor"):
        importlib.import_module(f"cdmap.cli.{name}")
