"""The exception types the CLI turns into one line: a user error (exit 2), or work that ran and failed (exit 1)."""


class SegpipeError(Exception):
    """Bad input from a user: a message that names the file, the item and what is wrong."""


class WorkFailed(SegpipeError):
    """The input was fine but the work failed where it ran (a worker crashed, the cluster gave out): exit code 1."""
