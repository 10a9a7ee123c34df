"""``cdmap pretrain``: a thin layer over :func:`cdmap.pretrain.pretrain` / :func:`cdmap.pretrain.resume`.

The recipe options are generated from the fields of :class:`cdmap.pretrain.config.PretrainConfig` (name, help,
type), so every knob is an option and none is declared twice; the command only maps them and calls the library.
"""


import dataclasses
import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from cdmap.cli.app import app
from cdmap.cli.options import Device, Overwrite, Quiet, Workers
from cdmap.pretrain.config import PRESETS, PretrainConfig

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
_LISTS = {"tuple[float, float]", "list[float] | None"}  # comma-separated numbers


def _option_type(annotation: str) -> Any:
    if annotation in _LISTS:
        return str
    return _TYPES[annotation.replace(" | None", "")]


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _recipe_parameters() -> list[inspect.Parameter]:
    params = []
    for f in dataclasses.fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _option_type(str(f.type))
        spec = f"{flag}/--no-{flag[2:]}" if kind is bool else flag
        help_text = f"{f.metadata['help']} (default: {_shown(f.default)}"
        if f.name in PRESETS["gpu"]:
            help_text += f"; gpu preset: {_shown(PRESETS['gpu'][f.name])}"
        help_text += ")"
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[kind | None, typer.Option(spec, help=help_text)]))
    return params


def _parse(name: str, value: Any, annotation: str) -> Any:
    if annotation not in _LISTS:
        return value
    from cdmap.errors import UsageError

    try:
        return [float(v) for v in str(value).split(",") if v.strip()]
    except ValueError as exc:
        raise UsageError(f"--{name.replace('_', '-')} expects comma-separated numbers, got {value!r}") from exc


def pretrain_cmd(
    data: Annotated[list[Path] | None, typer.Argument(
        help="GeoTIFFs (any size, bands, dtype) or folders of images or labelled LEVIR-style sets (A and B used).")]
    = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Run folder (backbone.pt, last.pt, "
                                                "metrics.csv).")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this folder.")] = None,
    preset: Annotated[str, typer.Option("--preset", help=f"Starting configuration: {', '.join(PRESETS)} "
                                        "(gpu: ResNet-34, 192 px, batch 64, full-size heads).")] = "cpu",
    stop_after: Annotated[int | None, typer.Option("--stop-after", help="Stop once this many epochs are done.")]
    = None,
    workers: Workers = 2,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    **recipe: Any,
) -> None:
    """CMID self-supervised pretraining of a backbone on unlabelled images (torchrun for several GPUs)."""
    from cdmap.errors import UsageError
    from cdmap.pretrain import PretrainRuntime
    from cdmap.pretrain import pretrain as run_pretrain
    from cdmap.pretrain import resume as resume_run

    types = {f.name: str(f.type) for f in dataclasses.fields(PretrainConfig)}
    given = {k: _parse(k, v, types[k]) for k, v in recipe.items() if v is not None}
    runtime = PretrainRuntime(workers=workers, device=device, quiet=quiet, overwrite=overwrite,
                              stop_after_epoch=stop_after)
    if resume is not None:
        if given or data or output is not None or overwrite:
            raise UsageError("only --workers, --device, --stop-after and --quiet can be given with --resume")
        result = resume_run(resume, runtime)
    else:
        if not data:
            raise UsageError("missing DATA (or use --resume RUN)")
        if output is None:
            raise UsageError("missing -o/--output RUN folder")
        result = run_pretrain(data, output, PretrainConfig.preset(preset, **given), runtime)
    if not quiet:
        import os

        if int(os.environ.get("RANK", "0")) == 0:
            state = "finished" if result.finished else f"stopped after epoch {result.epochs_completed}"
            last = result.history[-1] if result.history else {}
            typer.echo(f"{state}: loss {last.get('loss', float('nan')):.4f}, feature std "
                       f"{last.get('feature_std', float('nan')):.4f} -> {result.backbone_path}")


_sig = inspect.signature(pretrain_cmd)
pretrain_cmd.__signature__ = _sig.replace(  # type: ignore[attr-defined]
    parameters=[p for p in _sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    + _recipe_parameters())
app.command("pretrain")(pretrain_cmd)
