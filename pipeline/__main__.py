"""`python -m pipeline` runs the segpipe command."""

from pipeline.cli import main

main()
