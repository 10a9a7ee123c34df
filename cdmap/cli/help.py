"""Readable ``--help``: flags without a type, types in words, arguments in capitals.

Typer prints every parameter's Python type (``<bool>``, ``<list[str]>``, ``<Path,Path,Path>``). After the
commands are built, :func:`readable_help` gives each parameter without an explicit ``metavar`` a word for its
type; options with fixed choices set their ``metavar`` (``auto|fp32|bf16|fp16``) where they are declared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args, get_origin

_WORDS = {int: "INTEGER", float: "NUMBER", str: "TEXT", Path: "PATH", bool: ""}


def type_word(annotation: Any) -> str:
    """A word for a parameter's type: ``INTEGER``, ``NUMBER``, ``TEXT``, ``PATH``; lists and tuples of them."""
    origin = get_origin(annotation)
    args = [a for a in get_args(annotation) if a is not type(None)]
    if origin is list and args:
        return type_word(args[0])
    if origin is tuple and args:
        return " ".join(type_word(a) for a in args)
    if args and origin is not None and len(args) == 1:  # Optional[X]
        return type_word(args[0])
    return _WORDS.get(annotation, "VALUE")


def _fix(param: Any) -> None:
    if getattr(param, "param_type_name", "") == "argument":
        word = param.metavar or (param.name or "").upper()
        param.metavar = word
        param.display_type_rich = lambda ctx: None  # the name already says what it is
        if hasattr(param, "_usage_display_name"):  # typer writes required arguments as {NAME}
            usage = word if param.required else f"[{word}]"
            param._usage_display_name = lambda: usage + ("..." if param.nargs != 1 else "")
        return
    if getattr(param, "is_flag", False) and not getattr(param, "count", False):
        param.metavar = ""
        return
    if param.metavar is None:
        desc = getattr(param, "type_descriptor", None)
        param.metavar = type_word(desc.annotation) if desc is not None else "VALUE"


def readable_help(command: Any) -> Any:
    """Apply the rules above to every parameter of ``command`` and its sub-commands; returns ``command``."""
    for param in getattr(command, "params", []):
        _fix(param)
    get_help = getattr(command, "get_help_option", None)
    if get_help is not None:  # the help option is made per context, outside ``params``

        def help_option(ctx: Any, _get: Any = get_help) -> Any:
            opt = _get(ctx)
            if opt is not None:
                _fix(opt)
            return opt

        command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        readable_help(sub)
    return command
