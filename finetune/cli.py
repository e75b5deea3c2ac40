"""The command line. Each command declares its options, calls one library function and renders the result.

Library modules are imported inside the commands so that ``finetune --help`` and
config errors never wait for torch to import.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

from finetune.errors import FinetuneError

app = typer.Typer(
    help="Fine-tune a pretrained torchvision ResNet-18 on your own images, on a CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file.", show_default=False)]
SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="Override a config key: KEY=VALUE (dotted key, VALUE parsed as YAML). Repeatable.",
    show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


def _version(value: bool) -> None:
    if value:
        from finetune import __version__

        typer.echo(f"finetune {__version__}")
        raise typer.Exit()


@app.callback()
def _app(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Show the version and exit.")] = False) -> None:
    """Fine-tune a pretrained torchvision ResNet-18 on your own images, on a CPU."""


def _user_errors(command):
    """Print a FinetuneError in red on stderr and exit with its code: no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FinetuneError as exc:
            from rich.markup import escape

            from finetune.render import err_console

            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def _load(config: Optional[Path], overrides: Optional[list[str]]):
    from finetune.config import load_config

    return load_config(config, overrides or [])


@app.command("freeze-report")
@_user_errors
def freeze_report(config: ConfigOption = None, set_: SetOption = None, json: JsonOption = False) -> None:
    """Show what a config freezes, what trains, and what the optimizer receives.

    Example:  finetune freeze-report --config configs/quickstart.yaml --set 'freeze.trainable=["layer4","fc"]'
    """
    cfg = _load(config, set_)
    from finetune.render import print_freeze_report, print_json
    from finetune.report import build_freeze_report

    report = build_freeze_report(cfg)
    print_json(report.to_json()) if json else print_freeze_report(report)


def main() -> None:
    app(prog_name="finetune")
