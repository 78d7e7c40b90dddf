"""moe-surgeon's engine: donors, anatomy, plans, exports and sessions.

Nothing here imports Textual, and nothing at import time pulls in torch or transformers: the
command line must answer `inspect` and `export` faster than those libraries import.
"""

__version__ = "0.1.0"
