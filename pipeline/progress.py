"""Progress of long work: stages report what they do (and how far, when they can count it); the CLI draws it."""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from rich.console import Console
from rich.table import Table
from rich.text import Text


class Progress(Protocol):
    """What a stage calls as it goes: `progress("reading x")`, or `progress("shard 3/8 done", 3, 8)`.

    `what` reads well alone (it is the line written where there is no terminal); `done` and `total`, when
    given, move a bar."""

    def __call__(self, what: str, done: int | None = None, total: int | None = None) -> None: ...


def quiet(what: str, done: int | None = None, total: int | None = None) -> None:
    """Report nothing: every stage's default, for callers from Python."""


def lines(write=lambda line: print(line, file=sys.stderr, flush=True)) -> Progress:
    """One line per report, with the seconds since this call: for logs, files and pipes."""
    start = time.perf_counter()

    def report(what: str, done: int | None = None, total: int | None = None) -> None:
        write(f"{what} ({time.perf_counter() - start:.1f} s)")
    return report


def per_shard(progress: Progress, shards: int) -> Callable[[int], None]:
    """`map_shards`' callback (shards finished so far) as reports: "shard 3/8 done"."""
    return lambda count: progress(f"shard {count}/{shards} done", count, shards)


@contextmanager
def shown(console: Console | None = None) -> Iterator[Progress]:
    """A rich progress bar on stderr while the block runs; where stderr is no terminal (a log, a pipe, a test),
    `lines()` instead, as a bar's redraws would be unreadable there. Reports without counts are printed above the
    bar, so the phases stay on the screen."""
    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield lines(lambda line: print(line, file=console.file, flush=True))
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    with Bar(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
             TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def report(what: str, done: int | None = None, total: int | None = None) -> None:
            if total is None:
                bar.console.print(what, markup=False, highlight=False)
                bar.update(task, description=what)
            else:
                bar.update(task, description=what, completed=done, total=total)
        yield report


def show_table(rows: Sequence[Sequence[object]], header: Sequence[str] | None = None) -> None:
    """A command's closing table on stdout: with `header`, one column each; without, (name, value) rows such as
    counts and output paths."""
    table = Table(*(header or ()), show_header=header is not None, box=None, padding=(0, 2, 0, 0))
    if header is None:
        table.add_column(style="bold")
        table.add_column(overflow="fold")
    for row in rows:
        table.add_row(*(Text(str(value)) for value in row))  # as written: a path's [brackets] are no markup
    console = Console()
    if console.is_terminal:
        console.print(table)
        return
    # A log or a pipe: rows as wide as they need (rich would fold them at 80 columns), no trailing blanks.
    plain = Console(file=io.StringIO(), width=10_000)
    plain.print(table)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in plain.file.getvalue().splitlines()))
    sys.stdout.flush()
