"""Ray's own start-up noise stays off a user's terminal unless asked for (`segpipe --verbose`)."""

import os
import re
import subprocess
import sys

# A line of Ray's C++ core, e.g. "[2026-01-01 12:00:00,123 E 4242 4242] core_worker.cc:2465: ..."
NATIVE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] ")


def _infer(dataset, out, *flags):
    """`segpipe infer` as a user runs it: its own process, stderr a pipe (so progress is lines, not a bar)."""
    command = [sys.executable, "-m", "pipeline", *flags, "infer", "--input", str(dataset / "val"), "--model",
               "segpipe_small", "--random-weights", "--categories", str(dataset / "annotations" / "panoptic_val.json"),
               "--out", str(out), "--files-per-shard", "12"]
    env = {k: v for k, v in os.environ.items() if k != "SEGPIPE_RAY_LOGS"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_ray_start_up_lines_reach_the_terminal_only_with_verbose(dataset, tmp_path):
    quiet = _infer(dataset, tmp_path / "quiet")
    lines = quiet.stderr.splitlines()
    # Only segpipe's own progress: every line ends with its seconds, none is Ray's.
    assert lines and all(re.search(r"\(\d+\.\d s\)$", line) for line in lines), quiet.stderr
    assert not any(NATIVE.match(line) for line in lines)
    for noise in ("Started a local Ray instance", "Token authentication", "constructor arguments", "WARNING", "INFO"):
        assert noise not in quiet.stderr
    assert "shards 1/1, 12 images" in quiet.stderr and "segments" in quiet.stdout

    verbose = _infer(dataset, tmp_path / "verbose", "--verbose")
    assert "Started a local Ray instance" in verbose.stderr
    assert any(NATIVE.match(line) for line in verbose.stderr.splitlines()), verbose.stderr  # C++ lines come back
    assert "shards 1/1, 12 images" in verbose.stderr
