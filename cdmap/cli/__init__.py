"""Command-line interface: thin Typer commands over the library functions."""

from cdmap.cli.app import app, main

__all__ = ["app", "main"]
