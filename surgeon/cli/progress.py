"""What the command line prints while it works, and its warnings."""

from __future__ import annotations

import sys
import time

from surgeon.io.sizes import human_bytes


def warn(msg: str) -> None:
    print(f"moe-surgeon: warning: {msg}", file=sys.stderr)


def progress_printer(label: str):
    if not sys.stderr.isatty():
        return None
    state = {"t0": time.perf_counter(), "last": 0.0}

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - state["last"] < 0.2 and done < total:
            return
        state["last"] = now
        rate = done / max(now - state["t0"], 1e-9)
        eta = (total - done) / rate if rate else 0
        print(f"\r{label}: {100 * done / max(total, 1):5.1f}%  {human_bytes(done)} of {human_bytes(total)}"
              f"  {human_bytes(rate)}/s  ETA {eta:4.0f}s", end="" if done < total else "\n", file=sys.stderr)

    return report


def _amount(n: float, unit: str) -> str:
    return human_bytes(n) if unit == "bytes" else f"{n:,.0f}"


def _rate(per_second: float, unit: str) -> str:
    return f"{human_bytes(per_second)}/s" if unit == "bytes" else f"{per_second:,.1f} {unit}/s"


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
        elapsed = max(time.perf_counter() - step.started, 1e-9)
        rate = step.done / elapsed
        eta = (step.total - step.done) / rate if rate > 0 else 0.0
        label = step.label or self.label
        text = (f"{label}: {100 * step.fraction:5.1f}%  {_amount(step.done, step.unit)} of "
                f"{_amount(step.total, step.unit)} {'' if step.unit == 'bytes' else step.unit}".rstrip())
        text += f"  {_rate(rate, step.unit)}  ETA {eta:.0f}s"
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
