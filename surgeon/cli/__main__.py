"""`python -m surgeon.cli`: the same as the `moe-surgeon` console script."""

import sys

from surgeon.cli.main import main

sys.exit(main())
