"""Workbench start-up and key latency with two OLMoE-shaped donors of the real tensor count.

1. Launch to grid ready: `moe-surgeon A B` in a real pseudo-terminal; the app writes a timestamp
   when the first grid frame is on screen (MOE_SURGEON_READY_FILE) and quits. The goal's baseline,
   run in turn with it: a minimal Textual app (one Static) launched and timed the same way to its
   first frame. Also measured: `python -c pass`, importing textual, importing torch.
2. Key actions: each key's handler plus a full repaint of the grid, in-process (Pilot adds a
   fixed overhead per key, reported separately as the cost of an unbound key). Switching screens:
   a key that opens help, a layer or the donors, to the new screen drawn, and escape back.
3. The same handlers while a full-content hash runs in a thread of the same process, as the
   workbench's background hash of its donors does (`hash_files(..., background=True)` over a
   1 GiB file dropped from the page cache, never in the hash cache): median and worst of each, goal
   under 16 ms (one frame at 60 Hz).

Donors: 16 layers x 64 experts (3,219 tensors each, as OLMoE-1B-7B) with tiny hidden sizes:
start-up reads headers only, so the tensor count is what matters, not the bytes.

    python bench/tui.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pty
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from copy_timing import as_installed  # noqa: E402
from synthetic import write_donor  # noqa: E402

from surgeon.io.content_hash import hash_files  # noqa: E402

WORK = ROOT / "bench" / "_work" / "tui"
FOOTER_KEYS = 22  # the keys the grid's screen shows in its key bar
SWITCHES = {"question_mark": "help", "enter": "layer", "d": "donors"}  # keys that open a screen from the grid
HASHED = 1 << 30  # bytes the background hash reads while handlers are timed (dropped from the page cache)


def donors() -> list[Path]:
    out = []
    for i in range(2):
        path = WORK / f"olmoe-{i}"
        if not (path / "config.json").is_file():
            write_donor(path, seed=i, hidden=16, inter=8, vocab=256)
        out.append(path)
    return out


def in_pty(argv: list[str], env: dict) -> tuple[float, int]:
    """Run argv in a pseudo-terminal until it exits: (seconds from spawn to exit, its peak RSS in MiB).
    The peak counts from the fork, so call it from a process that holds no large memory."""
    t0 = time.time()
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(argv[0], argv, env)
    while True:
        try:
            if not os.read(fd, 65536):
                break
        except OSError:
            break
    _, _, usage = os.wait4(pid, 0)
    os.close(fd)
    return time.time() - t0, usage.ru_maxrss // 1024


def launch_to_ready(paths: list[Path], runs: int, work: Path = WORK, env: dict | None = None
                    ) -> tuple[list[float], list[int]]:
    """`moe-surgeon A B` in a pseudo-terminal, `runs` times: seconds to the first grid, and peak RSS (MiB)."""
    times, peaks = [], []
    ready = work / "ready"
    extra = env or {}
    for _ in range(runs):
        ready.unlink(missing_ok=True)
        env = {**os.environ, "MOE_SURGEON_READY_FILE": str(ready), "MOE_SURGEON_STATE_DIR": str(work / "state"),
               "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40", **extra}
        t0 = time.time()
        _, peak = in_pty([sys.executable, "-m", "surgeon.cli", *map(str, paths)], env)
        if not ready.is_file():
            raise SystemExit("the app did not report ready (see MOE_SURGEON_READY_FILE in screens/app.py)")
        times.append(float(ready.read_text()) - t0)
        peaks.append(peak)
    return times, peaks


# The goal's baseline: the least a Textual app does before its first frame (one widget), launched,
# timed and stopped as the workbench is (a pseudo-terminal; a timestamp once the frame is drawn).
# With MINIMAL_FOOTER_KEYS=N it also shows Textual's footer with N bindings, as the grid's screen does.
MINIMAL_APP = """
import os, time
from textual.app import App
from textual.binding import Binding
from textual.widgets import Footer, Static

KEYS = int(os.environ.get("MINIMAL_FOOTER_KEYS", "0"))

class Minimal(App):
    BINDINGS = [Binding(f"f{i + 1}", "bell", f"key {i + 1}") for i in range(KEYS)]

    def compose(self):
        yield Static("ready")
        if KEYS:
            yield Footer()

    def on_mount(self):
        self.call_after_refresh(self.ready)

    def ready(self):
        with open(os.environ["MOE_SURGEON_READY_FILE"], "w") as f:
            f.write(repr(time.time()))
        self.exit(0)

Minimal().run()
"""


def minimal_app_to_ready(runs: int, work: Path = WORK, footer_keys: int = 0) -> list[float]:
    """Seconds from spawn to the first frame of MINIMAL_APP, `runs` times."""
    ready = work / "ready-minimal"
    times = []
    for _ in range(runs):
        ready.unlink(missing_ok=True)
        env = {**os.environ, "MOE_SURGEON_READY_FILE": str(ready), "TERM": "xterm-256color",
               "COLUMNS": "120", "LINES": "40", "MINIMAL_FOOTER_KEYS": str(footer_keys)}
        t0 = time.time()
        in_pty([sys.executable, "-c", MINIMAL_APP], env)
        if not ready.is_file():
            raise SystemExit("the minimal Textual app did not report ready")
        times.append(float(ready.read_text()) - t0)
    return times


def import_time(code: str, runs: int) -> float:
    best = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        best.append(time.perf_counter() - t0)
    return statistics.median(best)


async def key_latency(paths: list[Path]) -> dict[str, float]:
    from screens.app import SurgeonApp

    app = SurgeonApp([str(p) for p in paths], None, state_dir=WORK / "state", offer_recovery=False)
    results: dict[str, list[float]] = {}
    async with app.run_test(size=(120, 40)) as pilot:
        for _ in range(3):
            await app.workers.wait_for_complete()
            await pilot.pause()
        grid = app.surgery.grid

        def repaint() -> None:
            for y in range(grid.size.height):
                grid.render_line(y)

        keys = ["j", "l", "space", "2", "1", "r", "c", "a", "u", "U", "X", "v", "G", "g", "b"]
        for _ in range(5):
            for key in keys:
                t0 = time.perf_counter()
                await pilot.press(key)
                pilot_time = time.perf_counter() - t0
                t0 = time.perf_counter()
                repaint()
                results.setdefault(key, []).append(pilot_time + (time.perf_counter() - t0))
            await pilot.press("escape")
        for _ in range(5):
            t0 = time.perf_counter()
            await pilot.press("z")  # unbound: Pilot's own cost per key
            results.setdefault("(unbound key)", []).append(time.perf_counter() - t0)
        # Switching screens: the key, the new screen composed, laid out and drawn (Pilot waits for
        # the screen to be idle), then escape back to the grid, drawn again.
        for key, name in SWITCHES.items():
            for _ in range(6):
                t0 = time.perf_counter()
                await pilot.press(key)
                await pilot.pause()
                results.setdefault(f"open {name}", []).append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await pilot.press("escape")
                await pilot.pause()
                results.setdefault(f"back from {name}", []).append(time.perf_counter() - t0)
        for _ in range(5):
            t0 = time.perf_counter()
            await pilot.press("z")
            await pilot.pause()
            results.setdefault("(unbound key + pause)", []).append(time.perf_counter() - t0)
        # Handler-only figures: the action methods called directly, then one grid repaint.
        screen = app.surgery
        direct = {
            "paint all (a)": lambda: screen.action_paint_all(),
            "reset (X)": lambda: screen.action_reset(),
            "undo (u)": lambda: screen.action_undo(),
            "cycle (space)": lambda: screen.action_cycle(),
            "column (c)": lambda: screen.action_paint_column(),
        }
        for label, fn in direct.items():
            samples = []
            for _ in range(10):
                t0 = time.perf_counter()
                fn()
                repaint()
                samples.append(time.perf_counter() - t0)
            results[label + " handler"] = samples
        samples = []  # the common undo: one mark taken back (the undo above takes back a whole-grid change)
        for _ in range(10):
            screen.action_cycle()
            repaint()
            t0 = time.perf_counter()
            screen.action_undo()
            repaint()
            samples.append(time.perf_counter() - t0)
        results["undo one mark handler"] = samples
        # The handlers in turn (each one's work then depends on the one before: a reset after a
        # paint-all moves every cell), with no hash running and then while a thread hashes a large
        # file, as the background hash does.
        async def in_turn(suffix: str, until) -> None:
            while True:
                for label, fn in direct.items():
                    t0 = time.perf_counter()
                    fn()
                    repaint()
                    results.setdefault(label + " handler, " + suffix, []).append(time.perf_counter() - t0)
                    await asyncio.sleep(0.005)
                if until():
                    return

        rounds = iter(range(20))
        await in_turn("in turn", lambda: next(rounds, None) is None)
        big = WORK / "hash-me.bin"
        if not big.is_file() or big.stat().st_size != HASHED:
            with big.open("wb") as f:
                for _ in range(HASHED >> 20):
                    f.write(os.urandom(1 << 20))
        os.utime(big)  # a new mtime: the hash cache never answers for it
        fd = os.open(big, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read from the disk, as a donor's first hash is
        os.close(fd)
        hashing = threading.Thread(target=hash_files, args=([big],), kwargs={"remember": False, "background": True})
        hashing.start()
        time.sleep(0.05)
        await in_turn("hashing", lambda: not hashing.is_alive())
        hashing.join()
        await app.workers.wait_for_complete()
    return {k: (statistics.median(v), max(v), len(v)) for k, v in results.items()}


async def layer_open(paths: list[Path], rounds: int = 6, marks_made: int = 40
                     ) -> tuple[int, list[float], list[float], list[float], list[float]]:
    """Opening the first layer with experts, as `enter` on its experts column does, to the layer
    screen's first frame, `rounds` times, in this process; then a mark there (space: the expert
    under the cursor to the next donor) `marks_made` times, its handler alone (the repaint draws
    only the visible lines), and Python's full collections meanwhile, which stop the app wherever
    they fall, then those that ran once the app was idle (held back while keys came). (The layer's
    tensors, seconds to the frame, seconds per mark, seconds per full collection during the marks
    and once idle.)"""
    import gc

    from screens import layer
    from screens.app import SurgeonApp

    frames: list[float] = []
    shown = layer.LayerScreen.on_mount

    def on_mount(screen) -> None:  # the bench's own stopwatch on the screen's first frame
        shown(screen)
        screen.call_after_refresh(lambda: frames.append(time.perf_counter()))

    layer.LayerScreen.on_mount = on_mount
    app = SurgeonApp([str(p) for p in paths], None, state_dir=WORK / "state", offer_recovery=False)
    seconds = []
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            while not app.ready:
                await asyncio.sleep(0.01)
            # The donors' background hash stops here: on DeepSeek-V3's true shapes (bench/true_shapes.py)
            # it would read 1.4 TB of sparse shards for many minutes before the layer is ever opened.
            app.hash_token.cancel()
            for _ in range(3):
                await app.workers.wait_for_complete()
                await pilot.pause()
            number = min(app.wb.index.experts_of, default=0)
            for _ in range(rounds):
                frames.clear()
                t0 = time.perf_counter()
                app.open_screen("layer", number, focus_kind="expert")
                while not frames:
                    await asyncio.sleep(0.001)
                seconds.append(frames[0] - t0)
                await pilot.press("escape")  # which also stops the screen's distance job
                await pilot.pause()
            app.open_screen("layer", number, focus_kind="expert")
            await pilot.pause()
            app.screen.cancel_job()
            marks, collections, started = [], [], [0.0]

            def timed(phase: str, info: dict) -> None:
                if phase == "start":
                    started[0] = time.perf_counter()
                elif info["generation"] == 2:
                    collections.append(time.perf_counter() - started[0])

            screen = app.screen
            handler = screen.action_cycle

            def cycle() -> None:  # the handler `space` runs, timed alone
                t0 = time.perf_counter()
                handler()
                marks.append(time.perf_counter() - t0)

            screen.action_cycle = cycle  # found by name when the key's binding runs
            gc.callbacks.append(timed)
            try:
                # A look at the layer first: the full collections held back while the layers opened
                # run once nobody types, then none while the keys come, then those held meanwhile.
                await asyncio.sleep(3 * app.IDLE_SECONDS)
                before = len(collections)
                for _ in range(marks_made):  # keys, as a user's: the app knows someone is typing
                    await pilot.press("space")
                    await pilot.pause()
                during = len(collections)
                await asyncio.sleep(3 * app.IDLE_SECONDS)
            finally:
                gc.callbacks.remove(timed)
            idle = collections[:before] + collections[during:]
            collections = collections[before:during]
            tensors = len({n for p, names in app.wb.index.tensors_of.items() if p.layer == number for n in names})
    finally:
        layer.LayerScreen.on_mount = shown
    return tensors, seconds, marks, collections, idle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layer-open", nargs=2, metavar="DIR", help=argparse.SUPPRESS)  # bench/true_shapes.py
    args = parser.parse_args()
    if args.layer_open:
        tensors, opened, marks, collections, idle = asyncio.run(layer_open([Path(d) for d in args.layer_open]))
        print(json.dumps({"tensors": tensors, "seconds": opened, "marks": marks, "collections": collections,
                          "idle_collections": idle}))
        return 0
    as_installed()
    WORK.mkdir(parents=True, exist_ok=True)
    paths = donors()
    from surgeon.core.donor import open_donor

    n = len(open_donor(paths[0]).tensors)
    print(f"donors: 2 x OLMoE-shaped, 16 layers x 64 experts, {n} tensors each")
    python = import_time("pass", args.runs)
    textual = import_time("import textual.app", args.runs)
    torch = import_time("import torch", 1)
    ready, minimal, footer = [], [], []
    for _ in range(args.runs):  # in turn, so a spell of load elsewhere hits all three
        ready += launch_to_ready(paths, 1)[0]
        minimal += minimal_app_to_ready(1)
        footer += minimal_app_to_ready(1, footer_keys=FOOTER_KEYS)
    med, least = statistics.median(ready), statistics.median(minimal)
    print(f"launch to grid ready  median {med:.3f} s  (min {min(ready):.3f}, max {max(ready):.3f}, {args.runs} runs; goal < 1.0 s)")
    print(f"  a minimal Textual app (one Static) to its first frame, the same way: median {least:.3f} s "
          f"(min {min(minimal):.3f}, max {max(minimal):.3f}); with Textual's footer of {FOOTER_KEYS} keys, as the "
          f"grid's screen shows, {statistics.median(footer):.3f} s (a bare app mounts the keys after that frame)")
    verdict = "met" if med <= 1.3 * least else "NOT met"
    pairs = sorted(r / m for r, m in zip(ready, minimal))  # each launch over the minimal app's just after it
    print(f"  ratio: ready / minimal app = {med / least:.2f}x (goal <= 1.3x: {verdict}); paired runs min / median / "
          f"max {pairs[0]:.2f} / {statistics.median(pairs):.2f} / {pairs[-1]:.2f}x; ready / import textual.app = "
          f"{med / textual:.2f}x")
    print(f"  baselines: python -c pass {python:.3f} s, import textual.app {textual:.3f} s, import torch {torch:.3f} s; "
          f"torch alone would take {torch / med:.2f}x our whole start")
    tensors, opened, marks, _, _ = asyncio.run(layer_open(paths))
    print(f"open a layer with experts ({tensors} tensors) to its first frame, in-process: median "
          f"{1000 * statistics.median(opened):.0f} ms (min {1000 * min(opened):.0f}, max {1000 * max(opened):.0f}, "
          f"{len(opened)} rounds); a mark there, handler: median {1000 * statistics.median(marks):.1f} ms, "
          f"worst {1000 * max(marks):.1f} ms (goal < 16 ms)")
    measured = asyncio.run(key_latency(paths))
    hashing = {k: v for k, v in measured.items() if k.endswith((", hashing", ", in turn"))}
    lat = {k: v[0] for k, v in measured.items() if k not in hashing}
    pilot = lat.pop("(unbound key)")
    paused = lat.pop("(unbound key + pause)")
    switches = {k: lat.pop(k) for k in list(lat) if k.startswith(("open ", "back from "))}
    handlers = {k: v for k, v in lat.items() if k.endswith("handler")}
    keys = {k: v for k, v in lat.items() if not k.endswith("handler")}
    slow_key = max(keys, key=keys.get)
    slow_handler = max(handlers, key=handlers.get)
    print(f"key actions via Pilot (press + wait + full grid repaint), median of 5; Pilot's own cost {1000 * pilot:.1f} ms")
    print("  " + "  ".join(f"{k}:{1000 * v:.1f}" for k, v in keys.items()) + "  (ms)")
    print(f"  slowest key {slow_key!r}: {1000 * keys[slow_key]:.1f} ms, {1000 * (keys[slow_key] - pilot):.1f} ms above an unbound key (goal < 50 ms)")
    print(f"screens: the key, then Pilot's wait until the new screen is drawn and idle, median of 6 "
          f"(an unbound key and the same wait: {1000 * paused:.1f} ms)")
    print("  " + "  ".join(f"{k}:{1000 * v:.1f}" for k, v in switches.items()) + "  (ms)")
    print("handlers called directly + grid repaint, median of 10:")
    for k, v in handlers.items():
        print(f"  {k:<26}{1000 * v:7.2f} ms")
    print(f"  slowest handler {slow_handler!r}: {1000 * handlers[slow_handler]:.2f} ms (goal < 50 ms)")
    print(f"the handlers in turn, idle and while a thread hashes {HASHED >> 20} MiB (the background hash): "
          "median / worst (samples)")
    for k, (med, worst, n) in sorted(hashing.items()):
        print(f"  {k:<36}{1000 * med:7.2f} / {1000 * worst:6.2f} ms  ({n})")
    if hashing:
        worst = max((k for k in hashing if k.endswith(", hashing")), key=lambda k: hashing[k][1])
        print(f"  worst: {worst!r} {1000 * hashing[worst][1]:.2f} ms (goal < 16 ms)")
    else:
        print("  (the hash ended before a handler ran: nothing measured)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
