"""Every command answers --help, and no command is left without one."""

from typer.testing import CliRunner

from pipeline.cli import app

COMMANDS = [["synth"], ["validate"], ["convert"], ["infer"], ["filter"], ["classify"], ["train"], ["engine", "run"], ["engine", "review"], ["engine", "status"], ["review", "export"], ["review", "import"], ["eval", "pq"], ["eval", "ap"], ["eval", "miou"], ["bench", "eval"], ["bench", "infer"], ["report"], ["bench", "report"], ["demo"]]


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
