"""Progress reports: one line each where stderr is no terminal, a rich bar where it is one; closing tables."""

import io
import re
import sys

from rich.console import Console

from pipeline.progress import lines, per_shard, show_table, shown


def test_without_a_terminal_every_report_is_one_readable_line():
    written = []
    report = lines(written.append)
    report("reading a.json")
    per_shard(report, 3)(2)
    assert [re.sub(r"\(\d+\.\d s\)$", "(T)", line) for line in written] == ["reading a.json (T)",
                                                                            "shard 2/3 done (T)"]


def test_shown_writes_lines_to_a_file_and_draws_a_bar_on_a_terminal():
    piped = io.StringIO()
    with shown(Console(file=piped, force_terminal=False)) as report:
        report("reading a.json")
        report("shard 1/2 done", 1, 2)
    assert [line.rsplit(" (", 1)[0] for line in piped.getvalue().splitlines()] == ["reading a.json", "shard 1/2 done"]

    terminal = io.StringIO()
    with shown(Console(file=terminal, force_terminal=True, width=100)) as report:
        report("reading a.json")
        report("labelling", 3, 8)
        report("labelling", 8, 8)
    drawn = terminal.getvalue()
    assert "\x1b[" in drawn and "reading a.json" in drawn  # a live display (cursor codes), the phase kept above it
    assert "labelling" in drawn and "8/8" in drawn  # the bar's own count column


def test_show_table_in_a_pipe_is_not_folded_and_has_no_trailing_blanks(capsys):
    long = "s3://bucket/" + "x" * 150 + "/predictions"
    show_table([("predictions", long), ("images", 8)])
    show_table([(4, "0.5000", "-")], header=("step", "PQ", "AP"))
    assert capsys.readouterr().out.splitlines() == [f"predictions  {long}", "images       8",
                                                    "step  PQ      AP", "4     0.5000  -"]
    assert not sys.stdout.isatty()
