"""Every command answers --help, and no command is left without one."""

from typer.testing import CliRunner

from pipeline.cli import app

COMMANDS = [["synth"], ["validate"], ["convert"], ["infer"], ["filter"], ["classify"], ["train"], ["engine", "run"], ["engine", "review"], ["engine", "status"], ["review", "export"], ["review", "import"], ["eval", "pq"], ["eval", "ap"], ["eval", "miou"], ["bench", "eval"], ["bench", "infer"], ["report"], ["bench", "report"], ["run"], ["submit"], ["jobs", "list"], ["jobs", "status"], ["jobs", "logs"], ["jobs", "stop"], ["schedule"], ["demo"]]


def _leaves(command, path=()):
    """Every runnable command of the click tree typer builds, with its path of names."""
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _leaves(sub, (*path, name))
    else:
        yield list(path), command


def test_every_command_has_help():
    import typer.main

    leaves = dict((tuple(path), command) for path, command in _leaves(typer.main.get_command(app)))
    assert sorted(leaves) == sorted(map(tuple, COMMANDS))  # no command is left out of this test
    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and all(name in top.stdout for name in ("synth", "validate", "infer", "eval", "bench"))
    for command in COMMANDS:
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, command
        # Its own usage line and the first words of its own docstring, not a parent's help.
        assert f"Usage: root {' '.join(command)} [OPTIONS]" in result.stdout, command
        summary = " ".join(leaves[tuple(command)].help.split()[:5])
        assert summary and summary in " ".join(result.stdout.split()), (command, summary)


def test_a_missing_option_is_a_usage_error_with_exit_2():
    result = CliRunner().invoke(app, ["eval", "pq", "--gt", "a.json"])
    assert result.exit_code == 2 and "Missing option '--pred'" in result.output


def test_infer_input_errors_are_one_line_with_exit_2(tmp_path):
    runner = CliRunner()
    common = ["--out", str(tmp_path / "out"), "--random-weights"]
    for arguments, message in (
        (["--input", str(tmp_path / "nowhere"), "--model", "segpipe_small"], "nowhere: no such file or folder"),
        (["--input", str(tmp_path), "--model", "yolo"], "unknown model 'yolo'"),
        (["--input", str(tmp_path), "--model", "segpipe_small", "--categories", str(tmp_path / "c.json")],
         "c.json: no such file"),
    ):
        result = runner.invoke(app, ["infer", *arguments, *common])
        assert result.exit_code == 2 and message in result.output.strip().splitlines()[-1], result.output
        assert "Traceback" not in result.output


def test_help_lists_the_verbs_in_groups_one_line_each_and_the_exit_codes():
    """At 100 columns: the groups in order, every command and sub-app in one of them on one line of its own, and
    the exit codes under them; the same for every sub-app's commands."""
    import typer.main

    from pipeline import cli

    root = typer.main.get_command(app)
    panels = [cli.DATA, cli.LABELING, cli.TRAINING, cli.EVALUATION, cli.JOBS, cli.BENCHMARKS]
    assert all(command.rich_help_panel in panels for command in root.commands.values())  # none in "Commands"
    runner = CliRunner(env={"COLUMNS": "100"})
    for path, group in [((), root)] + [((name,), sub) for name, sub in root.commands.items() if hasattr(sub, "commands")]:
        shown = runner.invoke(app, [*path, "--help"]).stdout
        rows = [line.strip("│ ") for line in shown.splitlines()]
        for name, command in group.commands.items():
            summary = " ".join(command.help.split("\n\n")[0].split())
            assert f"{name} {summary}" in [" ".join(row.split()) for row in rows], (path, name, summary)
    top = runner.invoke(app, ["--help"]).stdout
    used = [panel for panel in panels if f"─ {panel} ─" in top]
    assert used == sorted(used, key=top.index) and len(used) >= 5
    assert ("Exit codes: 0 done; 1 the work ran and found problems or failures (listed); 2 bad usage or input "
            "(one line on stderr).") in " ".join(top.split())


def test_every_command_has_a_runnable_looking_example():
    """Every leaf of the click tree (the commands other modules add too) shows `Example: segpipe <its own path> ...`."""
    import typer.main

    for path, command in _leaves(typer.main.get_command(app)):
        assert f"Example: segpipe {' '.join(path)} " in " ".join(command.help.split()), path
        shown = CliRunner().invoke(app, [*path, "--help"]).stdout
        assert f"Example: segpipe {' '.join(path)} " in " ".join(shown.replace("│", " ").split()), path



def test_work_that_failed_where_it_ran_is_one_line_and_exit_1_bad_input_exit_2():
    """A crash on the cluster (not the user's input) is exit 1, a user error exit 2; both one line, no traceback.
    The crash text is what Ray gives for a worker that died (infer's and train's one-line recovery of it)."""
    import typer

    from pipeline.cli import _user_errors
    from pipeline.errors import SegpipeError, WorkFailed
    from pipeline.infer import _ray_failure
    from pipeline.train import _worker_error

    crash = RuntimeError("ray.exceptions.ActorDiedError: The actor died unexpectedly\n  worker exit code 137\n")
    user = RuntimeError("Traceback (most recent call last):\npipeline.errors.SegpipeError: a.jpg: truncated\n")
    assert type(_ray_failure(crash)) is WorkFailed and str(_ray_failure(crash)).endswith("worker exit code 137")
    assert type(_worker_error(crash)) is WorkFailed and str(_worker_error(crash)).startswith("training failed: ")
    assert [type(f(user)) for f in (_ray_failure, _worker_error)] == [SegpipeError, SegpipeError]
    assert str(_ray_failure(user)) == str(_worker_error(user)) == "a.jpg: truncated"

    for error, code in ((_ray_failure(crash), 1), (_ray_failure(user), 2)):
        tiny = typer.Typer()

        @tiny.command()
        @_user_errors
        def fail() -> None:
            raise error

        result = CliRunner().invoke(tiny, [])
        assert result.exit_code == code and result.stderr == f"segpipe: error: {error}\n", result.output


def test_usage_errors_are_one_line_and_exit_2_through_the_command():
    """The real entry point (not CliRunner): click's boxed usage errors become segpipe's one line."""
    import subprocess
    import sys

    for args, message in ((["infer", "--model", "segpipe_small"], "segpipe: error: Missing option '--input'. "
                                                                  "(see 'segpipe infer --help')"),
                          (["evaluate"], "segpipe: error: No such command 'evaluate'. Did you mean 'validate', 'eval'? (see 'segpipe --help')"),
                          (["synth", "out", "--images", "many"], "Invalid value for '--images'")):
        done = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, (args, done.stderr)
        assert done.stdout == ""
