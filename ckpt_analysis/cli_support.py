"""What every command of the ``ckpt-analysis`` line shares: the console, the argument types and
the one decorator that turns bad input into a one-line error."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec

import typer
from rich.console import Console
from rich.markup import escape

from ckpt_analysis.errors import CkptAnalysisError

Params = ParamSpec("Params")

out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)  # logs and pipes: wide tables
JobArg = Annotated[Path, typer.Argument(help="Job spec (TOML); see docs/jobs.md and jobs/.")]
StoreArg = Annotated[Path, typer.Argument(help="A results store (the job's `output`).")]
OutputOpt = Annotated[
    str | None, typer.Option("--output", "-o", help="Override the job's output store path.")
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Recompute done units; replace a store of another spec.")
]


def fail(exc: CkptAnalysisError) -> typer.Exit:
    """Print ``exc`` as one red line on stderr; the exit (code 2) for the caller to raise."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
    return typer.Exit(2)


def reports_errors(command: Callable[Params, None]) -> Callable[Params, None]:
    """A command whose bad input (any CkptAnalysisError) is one red line on stderr and exit code 2."""

    @functools.wraps(command)
    def run_command(*args: Params.args, **kwargs: Params.kwargs) -> None:
        try:
            command(*args, **kwargs)
        except CkptAnalysisError as exc:
            raise fail(exc) from exc

    return run_command
