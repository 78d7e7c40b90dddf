"""The workbench app: owns the workbench, the session records and the live hybrid.

Screens edit `app.wb` (a surgeon.core.workbench.Workbench) and call `workbench_changed()`; the app then
repaints, marks the session modified and autosaves to the recovery file in a worker. The app's other
jobs each live in their own module, mixed in: opening donors and sessions in workers so the first
frame appears before any donor is read (app_loading.py), hashing the donors in the background
(app_hashing.py), saving, autosave and recovery (app_saving.py). Screens open by name through the
one table in screen_table.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable

from textual import events
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Static

from surgeon.core import collector
from surgeon.core.architectures import MIX_SOURCES
from surgeon.core.recovery import RecoveryWriter
from surgeon.core.session import SessionRecords
from surgeon.core.workbench import Workbench
from surgeon.jobs import CancelToken
from surgeon.live.keeper import HybridKeeper

from .app_hashing import HashingMixin
from .app_loading import LoadingMixin, donor_label
from .app_saving import SavingMixin
from .screen_table import SCREENS, screen_class
from .surgery import SurgeryScreen

DEMO_SPECS = ["demo:base", "demo:arith", "demo:reverse"]
READY_FILE_ENV = "MOE_SURGEON_READY_FILE"  # bench/tui.py: write a timestamp when the grid is ready, then quit


class SurgeonApp(LoadingMixin, HashingMixin, SavingMixin, App):
    # The grid's screen opens with the app: its styles are read with the app's, as one stylesheet.
    # Read when the screen opened (its CSS_PATH alone), they made Textual parse every source again
    # and restyle the whole app before the first frame.
    CSS_PATH = ["app.tcss", "surgery.tcss"]
    TITLE = "moe-surgeon"
    BINDINGS = [
        Binding("ctrl+s", "save", "Save", id="app.save", priority=True),
        Binding("ctrl+o", "open", "Open", id="app.open", priority=True),
        Binding("question_mark,f1", "help", "Help", key_display="?", id="app.help"),
        Binding("ctrl+q", "quit", "Quit", id="app.quit", priority=True),
        Binding("M", "mix", "Mix into an MoE", show=False, id="app.mix",
                tooltip="Mix dense donors into an MoE: their MLPs become its experts (from the grid)"),
    ]

    IDLE_SECONDS = 1.0  # this long without input, and a full collection held back may run

    def __init__(self, specs: list[str] | None = None, session_path: str | None = None, *,
                 state_dir: str | os.PathLike | None = None, offer_recovery: bool = True):
        super().__init__()
        self.specs = list(specs or [])
        self.initial_session = session_path
        self.wb: Workbench | None = None
        self.labels: dict[str, str] = {}
        self.brush: str | None = None
        self.session_path: str | None = None
        # What the session records besides the grid's plan (probes, results, exports, extensions);
        # screens add to it as the command line adds to a session file.
        self.records = SessionRecords()
        self.dirty = False
        self.recovery = RecoveryWriter(state_dir)
        self.hash_token = CancelToken()  # the running hash's: a new donor set or quitting stops it
        self.offer_recovery = offer_recovery
        self._generation = 0
        self.ready = False  # the first grid is on screen (tests and the benchmark wait for it)
        self.mix = None  # mix_state.MixState of the mix that is the workbench's base, if one is
        self.mix_pending = None  # a mix the open session records but whose export is missing
        self._banner: str | None = None
        self.hash_status: str | None = None  # "hashing donors 40%" while the background hashing shows
        self.recorded_hashes: dict[str, dict[str, str]] = {}  # the open session's full hashes, to compare
        self.hybrids = HybridKeeper()  # the one live hybrid: Probes, Sweep, Routing and Layer gates run on it
        self._last_input = time.monotonic()

    # ------------------------------------------------------------ start
    def get_default_screen(self) -> Screen:
        # The grid's screen is the app's first, not pushed on Textual's blank one: a pushed screen
        # made Textual lay out and paint both before the first frame.
        return SurgeryScreen()

    def on_mount(self) -> None:
        # Once the donors are open, full collections wait for a moment without input (on_loaded).
        self.set_interval(self.IDLE_SECONDS / 2, self._collect_when_idle)
        if self.initial_session:
            self.load_session(self.initial_session)
        else:
            self.load_donors(self.specs or DEMO_SPECS, welcome=not self.specs)

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.InputEvent):
            self._last_input = time.monotonic()
        await super().on_event(event)

    def _collect_when_idle(self) -> None:
        collector.collect_held(idle=time.monotonic() - self._last_input >= self.IDLE_SECONDS)

    @property
    def surgery(self) -> SurgeryScreen:
        for screen in self.screen_stack:
            if isinstance(screen, SurgeryScreen):
                return screen
        raise LookupError("no surgery screen")

    def _after_first_frame(self) -> None:
        ready_file = os.environ.get(READY_FILE_ENV)
        if ready_file:
            Path(ready_file).write_text(repr(time.time()))
            self.exit(0)
            return
        if self.offer_recovery:
            self._offer_recovery()

    # ------------------------------------------------------------ changes
    def brush_donor(self) -> str | None:
        if self.wb is None:
            return None
        if self.brush in self.wb.donors:
            return self.brush
        others = [n for n in self.wb.donors if n != self.wb.base]
        return others[0] if others else self.wb.base

    def distance_cache(self):
        """One cache for the app's life: distances are keyed by fingerprints, so they never go stale."""
        if getattr(self, "_distances", None) is None:
            from surgeon.features.distance import (
                DistanceCache,  # numpy: only when a layer is opened
            )

            self._distances = DistanceCache()
        return self._distances

    def session_label(self) -> str | None:
        return self.session_path

    def workbench_changed(self, *, rebuild: bool = False) -> None:
        """Every edit ends here: repaint, mark modified, autosave."""
        self.dirty = True
        for screen in self.screen_stack:
            if rebuild and isinstance(screen, SurgeryScreen):
                screen.show_workbench()
                self._banner = None  # show_workbench hid the welcome line
            elif hasattr(screen, "refresh_cells"):
                screen.refresh_cells()
        self.show_banner()
        self.autosave()

    def show_banner(self) -> None:
        """The welcome line speaks for mixing: the offer when every donor is dense, the mix once built.
        Only a change of the text shows it again, so w (hide) sticks while nothing changes."""
        if self.mix is None and self.wb is not None and any(
                d.model_type not in MIX_SOURCES for d in self.wb.donors.values()):
            text = None  # no mix, and not every donor could go into one (dense_problem's first test)
        else:
            from .mix_state import banner  # the mix's modules: 6 ms of the launch, only where they speak

            text = banner(self.wb, self.mix, self.mix_pending, self.labels)
        if text is None or text == self._banner:
            return
        self._banner = text
        try:
            welcome = self.surgery.query_one("#welcome", Static)
        except (LookupError, NoMatches):
            return
        welcome.update(text)
        welcome.display = True

    def refresh_status(self) -> None:
        for screen in self.screen_stack:
            if hasattr(screen, "refresh_status"):
                screen.refresh_status()

    # ------------------------------------------------------------ screens (screen_table.py)
    def pop_screen(self):
        _forget_drawn_lines()
        return super().pop_screen()

    def open_screen(self, name: str, *args, **kwargs) -> None:
        """Open the screen `name` of the table: refused with no donors open where it needs them, a
        kept one installed the first time (with these arguments) and shown again after."""
        entry = SCREENS[name]
        if entry.needs_donors and self.wb is None:
            if entry.refusal:
                self.notify(f"{entry.refusal}: no donors are open", severity="warning")
            return
        if entry.kept:
            self.kept_screen(name, *args, **kwargs)
            self.push_screen(name)
        else:
            self.push_screen(screen_class(name)(*args, **kwargs))

    def kept_screen(self, name: str, *args, **kwargs) -> Screen:
        """The app's one screen `name` (a kept one of the table), installed unshown if it never was."""
        if not self.is_screen_installed(name):
            self.install_screen(screen_class(name)(*args, **kwargs), name=name)
        return self.get_screen(name)

    def action_help(self) -> None:
        if not isinstance(self.screen, screen_class("help")):
            self.open_screen("help", self.screen)

    def action_donors(self) -> None:
        self.open_screen("donors")

    def action_export(self) -> None:
        self.open_screen("export")

    def action_mix(self) -> None:
        from .mix import mix_source

        source = mix_source(self)
        if isinstance(source, str):
            self.notify(source, title="Cannot mix", severity="warning", timeout=8)
            return
        self.open_screen("mix", source)

    def open_mix(self, state, donor, export_record) -> None:
        """A mix was built: its export is the base, its dense donors stay open beside it."""
        labels = {state.name: donor_label(str(state.export))}
        labels.update({n: self.labels.get(n, donor_label(str(d.path))) for n, d in state.donors.items()})
        self.mix, self.mix_pending = state, None
        self.wb = state.workbench(donor)
        self.labels = labels
        self.brush = state.name  # the one donor that can give the mix parts; Routing opens on it
        extensions = self.records.extensions
        if "mix" in extensions:  # the recipe of an earlier mix: the state has it now
            self.records.extensions = {k: v for k, v in extensions.items() if k != "mix"}
        self.records.exports.append(export_record)
        self.workbench_changed(rebuild=True)

    def check_action(self, action: str, parameters) -> bool | None:
        if action == "mix":  # M belongs to the grid: other screens keep the key (and their inputs)
            return isinstance(self.screen, SurgeryScreen)
        if action == "save" and hasattr(self.screen, "action_save_own_session"):
            return False  # a screen whose work is a session of its own (screens/prune.py) takes ctrl+s
        return True

    # ------------------------------------------------------------ discoverability
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """Every binding of the current screen and the app, by its description, in the palette."""
        yield from super().get_system_commands(screen)
        seen = set()
        for node in (screen.focused, screen, self):
            if node is None:
                continue
            for binding in node.BINDINGS:
                if not isinstance(binding, Binding) or binding.action in seen or binding.key.startswith(("up", "down", "left", "right")):
                    continue
                seen.add(binding.action)
                keys = binding.key_display or binding.key.split(",")[0]
                target = node

                def run(target=target, action=binding.action):
                    return self.run_action(action, target)

                yield SystemCommand(binding.description, f"{binding.tooltip or binding.description} ({keys})", run)


def _forget_drawn_lines() -> None:
    """Let a closed screen's widgets go with the lines they drew. Textual 8 keeps every widget's
    StylesCache, and its cached lines, in a 1,024-entry lru_cache keyed by the instance (its issue
    6665): each layer screen opened and closed left about 3,600 cache objects alive, which every
    full collection of the workbench then walked (DeepSeek-V3: 28-51 ms after six layers). The
    cache holds two Style objects per background colour and refills within a frame."""
    try:
        from textual._styles_cache import StylesCache

        StylesCache.get_inner_outer.cache_clear()
    except (ImportError, AttributeError):  # a Textual without that cache
        pass


def run_app(dirs: list[str], session_path: str | None) -> int:
    """`moe-surgeon [DIR ...] [--session FILE]`: the workbench on DIRs, a session, or the demo."""
    from surgeon.live.threads import configure_threads

    configure_threads()  # a caller that starts here, not in cli.main, gets the same threads
    app = SurgeonApp(dirs, session_path)
    app.run()
    return app.return_code or 0
