"""Where moe-surgeon keeps what it can recompute: $MOE_SURGEON_CACHE, else ~/.cache/moe-surgeon."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("MOE_SURGEON_CACHE", Path.home() / ".cache" / "moe-surgeon"))
