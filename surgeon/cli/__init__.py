"""The `moe-surgeon` command line: argument parsing and rendering per feature.

The only engine package that may start the workbench (screens.app).
"""

from surgeon.cli.main import main

__all__ = ["main"]
