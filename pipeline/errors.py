"""The one exception type for user errors: the CLI prints its message as one line and exits 2."""


class SegpipeError(Exception):
    """Bad input from a user: a message that names the file, the item and what is wrong."""
