"""Every command answers --help, and no command is left without one."""

from typer.testing import CliRunner

from pipeline.cli import app

COMMANDS = [["synth"], ["validate"], ["eval", "pq"], ["eval", "ap"], ["bench", "eval"]]


def test_every_command_has_help():
    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and all(name in top.stdout for name in ("synth", "validate", "eval", "bench"))
    for command in COMMANDS:
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, command
        assert "Usage:" in result.stdout and len(result.stdout.splitlines()) > 5, command


def test_a_missing_option_is_a_usage_error_with_exit_2():
    result = CliRunner().invoke(app, ["eval", "pq", "--gt", "a.json"])
    assert result.exit_code == 2 and "Missing option '--pred'" in result.output
