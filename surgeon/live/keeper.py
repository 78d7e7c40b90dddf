"""One live hybrid for a process that probes again and again (the workbench): kept across runs and
moved to each run's plan by hot-swap, so a run after a mark copies only the tensors whose source
changed. Built anew when the donors, the base, the device or the dtype differ, and let go after a
failure that may have left it half-swapped."""

from __future__ import annotations

import threading
from typing import Callable


class HybridKeeper:
    def __init__(self) -> None:
        self.hybrid = None
        self._key: tuple | None = None
        self._lock = threading.Lock()  # jobs run on threads; one of them builds at a time

    @staticmethod
    def key(plan, donors: dict, device: str, dtype: str) -> tuple:
        return (tuple((n, str(d.path), d.fingerprint) for n, d in donors.items()), plan.base, device, dtype)

    def get(self, plan, donors: dict, device: str, dtype: str = "keep",
            note: Callable[[str], None] | None = None) -> tuple[object, bool]:
        """(the live hybrid for these donors, base, device and dtype, whether it was built now). It
        is not moved to `plan` here: the caller applies the plan (and reports the swap)."""
        from surgeon.live.hybrid import Hybrid

        key = self.key(plan, donors, device, dtype)
        with self._lock:
            if self.hybrid is not None and self._key == key:
                return self.hybrid, False
            self.hybrid = self._key = None  # the old model goes before a new one loads
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # its tqdm bar would write over a terminal UI
            if note is not None:
                note(f"materialising the hybrid on {device} (the first run loads torch and transformers)…")
            self.hybrid = Hybrid.materialize(plan, donors, device=device, dtype=dtype)
            self._key = key
            return self.hybrid, True

    def drop(self) -> None:
        """Forget the hybrid: a swap stopped half-way leaves tensors of two plans in it."""
        with self._lock:
            self.hybrid = self._key = None
