"""`python -m surgeon.cli`: the same as the `moe-surgeon` console script."""

from surgeon.cli.main import entry

entry()
