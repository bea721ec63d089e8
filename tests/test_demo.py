"""`segpipe demo`: every step runs, and the closing table's numbers are the ones its files hold."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from pipeline import demo
from pipeline.errors import SegpipeError


def _segpipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def _forwarded(line: str) -> bool:
    """Whether Ray printed the line for one of its workers or actors: "(Name pid=N) ...", maybe coloured."""
    return re.match(r"(\x1b\[\d+m)?\(\w+ pid=\d+", line) is not None


def _rows(stdout: str) -> dict[str, list[str]]:
    """The closing table's rows by step name, cut at the header's column starts (its columns are left-aligned)."""
    header, *lines = [line for line in stdout.splitlines() if line]
    starts = [header.index(name) for name in demo.HEADER]
    assert header.split() == " ".join(demo.HEADER).split()  # stdout is the table alone
    cells = [[line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])] for line in lines]
    return {row[0]: row[1:] for row in cells}


def test_small_demo_table_agrees_with_the_files_it_wrote(tmp_path):
    out = tmp_path / "demo-out"
    done = _segpipe("demo", "--out", str(out), "--small")
    assert done.returncode == 0, done.stderr[-3000:]
    # No traceback of segpipe's: lines Ray forwards from its own actors, "(TrainController pid=...) ...", may hold
    # Ray Train's when the machine is overloaded (it retries; plain `segpipe train` prints them too).
    assert not [line for line in done.stderr.splitlines() if "Traceback" in line and not _forwarded(line)]
    steps = ["synthesise", "validate", "start Ray", "train", "label", "evaluate PQ", "evaluate AP", "engine round",
             "stop Ray", "report"]
    for number, step in enumerate(steps, 1):
        assert f"demo {number}/{len(steps)}: {step} (" in done.stderr
    rows = _rows(done.stdout)
    assert list(rows) == [*steps, "total"]
    result = {name: row[1] for name, row in rows.items()}

    pq = json.loads((out / "labels-val" / "pq.json").read_text())
    ap = json.loads((out / "labels-val" / "ap.json").read_text())
    assert result["evaluate PQ"].startswith(f"PQ {pq['All']['pq']:.4f} (things {pq['Things']['pq']:.4f}, "
                                            f"stuff {pq['Stuff']['pq']:.4f})")
    assert result["evaluate AP"] == f"mask AP {ap['stats'][0]:.4f} (AP50 {ap['stats'][1]:.4f})"
    before, after = (json.loads((out / "engine" / f"round-{r}" / "manifest.json").read_text()) for r in (0, 1))
    assert result["engine round"] == (
        f"held-out PQ {before['heldout']['pq']:.4f} -> {after['heldout']['pq']:.4f}, "
        f"{'promoted' if after['promoted'] else 'not promoted'}; kept {after['filter']['kept']} of "
        f"{after['filter']['candidates']} pseudo-labels")
    assert after["filter"]["kept"] > 0 and after["stages"]["retrain"]["state"] == "done"
    labelled = json.loads((out / "labels-val" / "summary.json").read_text())
    assert result["label"].startswith(f"{labelled['images']} images, {labelled['segments']} segments, 0 failed")
    assert labelled["images"] == len(json.loads((out / "annotations" / "panoptic_val.json").read_text())["images"])
    small, shards = demo.SMALL, len(list((out / "shards").glob("train-*.tar")))
    assert shards == math.ceil(small.train / small.shard_size)
    assert result["synthesise"] == f"train {small.train} ({shards} tar shards), val {small.val}, pool {small.pool} images"
    assert result["validate"] == "val: panoptic valid, instances valid"

    report = json.loads((out / "report" / "report.json").read_text())
    assert (out / "report" / "report.html").stat().st_size > 10_000
    assert report["inputs"]["pred"] == str(out / "labels-val")
    assert rows["report"][2] == "report/report.html, report/report.json"
    # The report's PQ of the same predictions is eval pq's.
    assert report["errors"]["pq"]["All"]["pq"] == pq["All"]["pq"]

    # demo.json: the same steps and seconds as the table, the numbers of the files.
    summary = json.loads((out / "demo.json").read_text())
    assert [(s["name"], f"{s['seconds']:.1f}") for s in summary["steps"]] == [(n, rows[n][0]) for n in steps]
    assert (summary["pq"], summary["ap"], summary["promoted"]) == (pq["All"]["pq"], ap["stats"][0], after["promoted"])
    assert summary["problems"] == []


def test_a_non_empty_out_is_refused_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for args, message in (([], "not empty; pass --force"), (["--force"], "not a segpipe demo's (no demo.json)")):
        done = _segpipe("demo", "--out", str(tmp_path), *args)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
        assert (tmp_path / "notes.txt").read_text() == "mine"


def test_force_replaces_only_an_earlier_demo(tmp_path):
    earlier = tmp_path / "earlier"
    (earlier / "model").mkdir(parents=True)
    (earlier / "model" / "model.pt").write_bytes(b"old")
    (earlier / demo.MARKER).write_text("{}")
    with pytest.raises(SegpipeError, match="not empty"):
        demo.prepare(str(earlier), force=False)
    demo.prepare(str(earlier), force=True)
    assert earlier.is_dir() and not any(earlier.iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(SegpipeError, match="is a file"):
        demo.prepare(str(tmp_path / "file"), force=True)
    demo.prepare(str(tmp_path / "new" / "out"), force=False)  # a folder that does not exist yet is made
    assert (tmp_path / "new" / "out").is_dir()
