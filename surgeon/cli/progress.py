"""What the command line prints while it works, and its warnings."""

from __future__ import annotations

import sys
import time

from surgeon.io.sizes import amount_text, rate_text


def warn(msg: str) -> None:
    print(f"moe-surgeon: warning: {msg}", file=sys.stderr)


class StepPrinter:
    """Draws `surgeon.jobs.Step`s on stderr: one line rewritten in place on a terminal; elsewhere (a log,
    CI) a plain line every `every` seconds, so a long job is never silent. Both show rate and ETA."""

    def __init__(self, label: str, stream=None, every: float | None = None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every if every is not None else (0.2 if self.tty else 5.0)
        self._last = 0.0

    def line(self, step) -> str:
        rate, eta = step.rate(), step.eta()
        label = step.label or self.label
        text = (f"{label}: {100 * step.fraction:5.1f}%  {amount_text(step.done, step.unit)} of "
                f"{amount_text(step.total, step.unit)} {'' if step.unit == 'bytes' else step.unit}".rstrip())
        text += f"  {rate_text(rate, step.unit)}  ETA {eta:.0f}s"
        return text + (f"  {step.detail}" if step.detail else "")

    def __call__(self, step) -> None:
        now = time.perf_counter()
        if now - self._last < self.every and not step.finished:
            return
        self._last = now
        if self.tty:
            print("\r" + self.line(step), end="\n" if step.finished else "", file=self.stream, flush=True)
        else:
            print(self.line(step), file=self.stream, flush=True)


def note_loading(label: str, name: str, donor) -> None:
    """One line before a model loads: importing torch and transformers and filling the model take
    seconds in which no step can be counted, and a silent command looks hung."""
    from surgeon.io.sizes import human_bytes

    size = sum(shard.size for shard in donor.shards.values())
    print(f"{label}: loading {name} ({human_bytes(size)})…", file=sys.stderr, flush=True)
