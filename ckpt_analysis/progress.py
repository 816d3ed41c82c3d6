"""Progress display: a rich bar on a terminal, periodic log lines otherwise (e.g. SLURM logs)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

log = logging.getLogger(__name__)


class Advance(Protocol):
    def __call__(self, label: str, ok: bool) -> None: ...


@contextmanager
def progress(total: int, description: str, *, every_s: float = 30.0) -> Iterator[Advance]:
    """Yield ``advance(label, ok)``; draws a bar when stderr is a terminal, else logs lines."""
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[last]}"),
            transient=False,
        ) as bar:
            task = bar.add_task(description, total=total, last="")

            def advance_bar(label: str, ok: bool) -> None:
                bar.update(task, advance=1, last=label if ok else f"[red]failed: {label}")

            yield advance_bar
        return
    state = {"done": 0, "last": time.monotonic()}

    def advance_log(label: str, ok: bool) -> None:
        state["done"] += 1
        now = time.monotonic()
        if not ok or state["done"] == total or now - state["last"] >= every_s:
            log.info("%s: %d/%d (%s%s)", description, state["done"], total, "" if ok else "FAILED ", label)
            state["last"] = now

    yield advance_log


def quiet_transformers_bars() -> None:
    """Turn off transformers' own progress bars: one "Loading weights" or "Writing model shards"
    bar per checkpoint is noise inside a sweep, which draws its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
