"""The workbench app: owns the workbench, the session file and the recovery file.

Screens edit `app.wb` (a surgeon.core.workbench.Workbench) and call `workbench_changed()`; the app then
repaints, marks the session modified and autosaves to the recovery file in a worker. Opening
donors and sessions also runs in workers (header reads of a sharded checkpoint can take a while
on network storage), so the first frame appears before any donor is read.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Static

from surgeon.core.plan import next_donor_name
from surgeon.core.recovery import RecoveryWriter, load_recovery, orphans
from surgeon.core.session import SessionRecords
from surgeon.core.workbench import Workbench
from surgeon.errors import SurgeonError
from surgeon.io.fs import error_line
from surgeon.jobs import Cancelled, CancelToken
from surgeon.live.keeper import HybridKeeper

from .dialogs import ConfirmScreen, ErrorScreen, PathScreen
from .surgery import SurgeryScreen

DEMO_SPECS = ["demo:base", "demo:arith", "demo:reverse"]
READY_FILE_ENV = "MOE_SURGEON_READY_FILE"  # bench/tui.py: write a timestamp when the grid is ready, then quit


class Loaded(Message):
    """A worker opened donors (and maybe a session): the new state of the app."""

    def __init__(self, wb: Workbench | None, labels: dict[str, str], *, session_path: str | None = None,
                 records: SessionRecords | None = None, errors: list[str] | None = None, welcome: bool = False,
                 dirty: bool = False, recovered_from: str | None = None, mix=None, mix_pending=None,
                 note: str | None = None, recorded_hashes: dict[str, dict[str, str]] | None = None):
        super().__init__()
        self.recorded_hashes = recorded_hashes or {}  # donor -> shard -> full hash, as the session says
        self.mix = mix  # mix_state.MixState: the session records a mix and its export is the base
        self.mix_pending = mix_pending  # the session records a mix whose export is missing
        self.note = note
        self.wb = wb
        self.labels = labels
        self.session_path = session_path
        self.records = records or SessionRecords()
        self.errors = errors or []
        self.welcome = welcome
        self.dirty = dirty
        self.recovered_from = recovered_from


class Hashing(Message):
    """Progress of the background full-content hashing of the open donors; `done` at the end."""

    def __init__(self, text: str | None, done: dict[str, dict[str, str]] | None = None):
        super().__init__()
        self.text, self.done = text, done

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Hashing) and message.done is None and self.done is None


class Failed(Message):
    def __init__(self, title: str, message: str):
        super().__init__()
        self.title = title
        self.message = message


class DonorOpened(Message):
    def __init__(self, donor, spec: str):
        super().__init__()
        self.donor = donor
        self.spec = spec


def _label(spec: str) -> str:
    return spec if spec.startswith("demo:") else (os.path.basename(os.path.normpath(spec)) or spec)


class SurgeonApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "moe-surgeon"
    BINDINGS = [
        Binding("ctrl+s", "save", "Save", id="app.save", priority=True),
        Binding("ctrl+o", "open", "Open", id="app.open", priority=True),
        Binding("question_mark,f1", "help", "Help", key_display="?", id="app.help"),
        Binding("ctrl+q", "quit", "Quit", id="app.quit", priority=True),
        Binding("M", "mix", "Mix into an MoE", show=False, id="app.mix",
                tooltip="Mix dense donors into an MoE: their MLPs become its experts (from the grid)"),
    ]

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
        self.hybrids = HybridKeeper()  # the one live hybrid the Probes and Sweep screens run on

    # ------------------------------------------------------------ start
    def on_mount(self) -> None:
        self.push_screen(SurgeryScreen())
        if self.initial_session:
            self.load_session(self.initial_session)
        else:
            self.load_donors(self.specs or DEMO_SPECS, welcome=not self.specs)

    @property
    def surgery(self) -> SurgeryScreen:
        for screen in self.screen_stack:
            if isinstance(screen, SurgeryScreen):
                return screen
        raise LookupError("no surgery screen")

    @work(thread=True, exit_on_error=False, group="load")
    def load_donors(self, specs: list[str], welcome: bool = False) -> None:
        try:
            self._load_donors(specs, welcome)
        except Exception as e:  # noqa: BLE001 - a worker's exception is silent: the app would wait forever
            self.post_message(Failed("Cannot open the donors", error_line(e)))

    def _load_donors(self, specs: list[str], welcome: bool) -> None:
        from surgeon.core.donor import open_donor

        donors, labels, errors = {}, {}, []
        for spec in specs:
            try:
                donor = open_donor(spec)
            except SurgeonError as e:
                errors.append(str(e))
                continue
            if any(d.path.resolve() == donor.path.resolve() for d in donors.values()):
                errors.append(f"{spec}: given twice")
                continue
            name = next_donor_name(donors)
            donors[name] = donor
            labels[name] = _label(spec)
        wb = None
        if donors:
            wb = Workbench(donors, next(iter(donors)))
            for name in donors:
                wb.problem(name)  # warm the compatibility cache off the UI thread
        if welcome and not donors:
            errors = ["The demo donors are missing from this installation (surgeon/demo/data). "
                      "Start with checkpoint directories: moe-surgeon DIR DIR ..."]
        self.post_message(Loaded(wb, labels, errors=errors, welcome=welcome and bool(donors)))

    @work(thread=True, exit_on_error=False, group="load")
    def load_session(self, path: str, *, recovered: str | None = None) -> None:
        try:
            self._load_session(path, recovered)
        except Exception as e:  # noqa: BLE001 - as in load_donors: never stay on "opening..."
            self.post_message(Failed("Cannot open the session", error_line(e)))

    def _load_session(self, path: str, recovered: str | None) -> None:
        from surgeon.core.session import load_session, open_session_donors

        try:
            if recovered:
                rec = load_recovery(Path(recovered))
                session, origin = rec.session, rec.session_path
                where = rec.session_path or os.getcwd() + "/x"
            else:
                session, origin = load_session(path), path
                where = path
            donors = open_session_donors(session, where)
            mix = pending = note = None
            extensions = session.extensions
            if "mix" in extensions:  # a mix session: its export becomes the base when it is on disk
                from surgeon.features.mix.workbench import restore_mix

                state, mix_donor, note = restore_mix(session, where, donors)
                if mix_donor is None:
                    pending = state
                else:
                    mix = state
                    extensions = {k: v for k, v in extensions.items() if k != "mix"}  # the state writes it
            wb = mix.workbench(mix_donor) if mix is not None else Workbench(donors, session.plan.base, session.plan)
            for name in wb.donors:
                wb.problem(name)
        except SurgeonError as e:
            self.post_message(Failed("Cannot open the session", str(e)))
            return
        labels = {d.name: (d.path if d.path.startswith("demo:") else (d.label or _label(d.path))) for d in session.donors}
        if mix is not None:
            labels[mix.name] = _label(str(mix.export))
        records = SessionRecords.of(session)
        records.extensions = extensions
        recorded = {d.name: d.content_hashes for d in session.donors if d.content_hashes}
        self.post_message(Loaded(wb, labels, session_path=origin, records=records, dirty=bool(recovered),
                                 recovered_from=recovered, mix=mix, mix_pending=pending, note=note,
                                 recorded_hashes=recorded))

    @on(Loaded)
    def on_loaded(self, message: Loaded) -> None:
        first = not self.ready
        if message.wb is not None or first:
            self.wb = message.wb
            self.labels = message.labels
            self.session_path = message.session_path
            self.records = message.records
            self.dirty = message.dirty
            self.mix, self.mix_pending = message.mix, message.mix_pending
            self.brush = self.mix.name if self.mix is not None else None
        screen = self.surgery
        screen.show_workbench(welcome=message.welcome)
        self._banner = None  # show_workbench set the welcome line
        self.show_banner()
        if message.note:
            self.notify(message.note, title="Mix", severity="warning", timeout=10)
        if self.wb is None:
            screen.show_empty("\n".join(message.errors) + "\n\nPress d to add a donor or ctrl+o to open a session.")
        elif message.errors:
            self.notify("\n".join(message.errors), title="Some donors did not open", severity="error", timeout=10)
        if message.recovered_from:
            try:
                os.unlink(message.recovered_from)
            except OSError:
                pass
            self.notify("Restored the unsaved work of the last run.", title="Recovered")
            self.autosave()
        if message.session_path and not message.recovered_from:
            self.notify(f"opened {message.session_path}", timeout=3)
        if self.wb is not None and message.wb is not None:
            self.recorded_hashes = message.recorded_hashes
            self.start_hashing()
        if first:
            self.ready = True
            self.call_after_refresh(self._after_first_frame)

    # ------------------------------------------------------------ full content hashes
    def start_hashing(self) -> None:
        self.hash_token.cancel()  # a thread cannot be stopped from outside: it checks this token
        self.hash_token = CancelToken()
        self.hash_donors(dict(self.wb.donors), self.hash_token)

    def on_unmount(self) -> None:
        # Two 7B donors take minutes to read: quitting must not wait for that (what was hashed of
        # a file is lost; a later start hashes it again).
        self.hash_token.cancel()

    @work(thread=True, exit_on_error=False, group="hash", exclusive=True)
    def hash_donors(self, donors: dict, cancel: CancelToken) -> None:
        """Hash every open donor in full, in the background, so a saved session can prove its donors
        (replay checks them). Marking and browsing never wait for it; a donor hashed before costs a
        stat per shard. Progress shows on the status line only when hashing takes over a second."""
        started = time.perf_counter()
        total = sum(h.size for d in donors.values() for h in d.shards.values()) or 1
        before = 0
        done: dict[str, dict[str, str]] = {}
        for name, donor in donors.items():
            def progress(step, before=before):
                if time.perf_counter() - started > 1.0:
                    self.post_message(Hashing(f"hashing donors {100 * (before + step.done) / total:.0f}%"))
            try:
                done[name] = donor.full_hashes(progress=progress, cancel=cancel, background=True)
            except Cancelled:
                return
            except SurgeonError as e:
                self.post_message(Failed(f"Cannot hash donor {name}", str(e)))
            before += sum(h.size for h in donor.shards.values())
        self.post_message(Hashing(None, done=done))

    @on(Hashing)
    def on_hashing(self, message: Hashing) -> None:
        self.hash_status = message.text
        if message.done is not None:
            changed = [name for name, hashes in self.recorded_hashes.items()
                       if name in message.done and message.done[name] != hashes]
            if changed:
                self.notify(f"donor(s) {', '.join(changed)} changed since the session was saved: their bytes differ "
                            "from the session's full content hashes", title="Donors changed", severity="error",
                            timeout=15)
        self.refresh_status()

    def _after_first_frame(self) -> None:
        ready_file = os.environ.get(READY_FILE_ENV)
        if ready_file:
            Path(ready_file).write_text(repr(time.time()))
            self.exit(0)
            return
        if self.offer_recovery:
            self._offer_recovery()

    def _offer_recovery(self) -> None:
        if self.wb is None:
            return
        try:
            # Only the unsaved work of these donors: another donor set's stays for its own start.
            found = orphans(self.recovery.directory, donors=[d.path for d in self.wb.donors.values()])
            path = found[0] if found else None
            when = path and time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
        except OSError:
            return
        if path is None:
            return
        names = ", ".join(sorted(self.labels.get(n, n) for n in self.wb.donors))

        def answer(yes: bool | None) -> None:
            if yes:
                self.load_session("", recovered=str(path))
            else:
                try:
                    path.unlink()
                except OSError:
                    pass

        self.push_screen(ConfirmScreen(
            f"moe-surgeon did not exit cleanly last time ({when}) with these donors ({names}). Restore "
            f"the unsaved marks from {path}?", yes="Restore", no="Discard"), answer)

    @on(Failed)
    def on_failed(self, message: Failed) -> None:
        if not self.ready:
            self.ready = True
            self.surgery.show_empty("No session open. Press d to add a donor or ctrl+o to open a session.")
        self.push_screen(ErrorScreen(message.title, message.message))

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
        from .mix_state import banner

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

    def session_json(self, session_path: str | None) -> dict:
        from surgeon.core.session import make_session

        # While the grid is the plain mix, the session is its recipe (what `mix --session` writes).
        mixed = self.mix is not None and self.mix.matches(self.wb)
        session = self.mix.session(session_path) if mixed else make_session(self.wb.plan(), self.wb.donors, session_path)
        recipe = session.extensions.get("mix")
        for ref in session.donors:
            ref.label = self.labels.get(ref.name, ref.label)
        self.records.fill(session)
        if mixed:
            session.extensions = {**session.extensions, "mix": recipe}
        return session.to_json()

    def autosave(self) -> None:
        if self.wb is None:
            return
        self._generation += 1
        self._write_recovery(self._generation, self.session_json(None), self.session_path)

    @work(thread=True, exit_on_error=False, group="autosave")
    def _write_recovery(self, generation: int, data: dict, session_path: str | None) -> None:
        try:
            self.recovery.write(generation, data, session_path)
        except OSError as e:
            self.call_from_thread(self.notify, f"autosave failed: {e}", severity="error")

    # ------------------------------------------------------------ sessions
    def action_save(self) -> None:
        if self.wb is None:
            self.notify("nothing to save: no donors are open", severity="warning")
            return
        if self.session_path is None:
            self.push_screen(PathScreen("Save the session as", "session.json"), self._save_to)
        else:
            self._save_to(self.session_path)

    def _save_to(self, path: str | None) -> None:
        if not path:
            return
        from surgeon.core.session import parse_session, save_session

        try:
            session = parse_session(self.session_json(path), path)
            save_session(session, path)
        except (SurgeonError, OSError) as e:
            self.push_screen(ErrorScreen("Cannot save the session", str(e)))
            return
        self.session_path = path
        self.dirty = False
        self.refresh_status()
        self.autosave()
        self.notify(f"saved {path}", timeout=3)

    def action_open(self) -> None:
        def chosen(path: str | None) -> None:
            if path:
                self.load_session(path)

        self.push_screen(PathScreen("Open a session file", self.session_path or "", must_exist=True), chosen)

    def action_help(self) -> None:
        from .help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.screen))

    def action_donors(self) -> None:
        from .donors import DonorsScreen

        self.push_screen(DonorsScreen())

    def action_export(self) -> None:
        if self.wb is None:
            self.notify("nothing to export: no donors are open", severity="warning")
            return
        from .export import ExportScreen

        self.push_screen(ExportScreen())

    def action_probes(self) -> None:
        """One Probes screen for the app's life: it keeps the live hybrid and the picked probes."""
        from .probes import ProbesScreen

        self._push_kept("probes", ProbesScreen, "nothing to probe")

    def action_sweep(self) -> None:
        """One Sweep screen for the app's life: it keeps the form and the shown sweep."""
        from .sweep import SweepScreen

        self._push_kept("sweep", SweepScreen, "nothing to sweep")

    def action_mix(self) -> None:
        from .mix import MixScreen, mix_source

        source = mix_source(self)
        if isinstance(source, str):
            self.notify(source, title="Cannot mix", severity="warning", timeout=8)
            return
        self.push_screen(MixScreen(source))

    def open_mix(self, state, donor, export_record) -> None:
        """A mix was built: its export is the base, its dense donors stay open beside it."""
        labels = {state.name: _label(str(state.export))}
        labels.update({n: self.labels.get(n, _label(str(d.path))) for n, d in state.donors.items()})
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

    def _push_kept(self, name: str, factory, refusal: str) -> None:
        if self.wb is None:
            self.notify(f"{refusal}: no donors are open", severity="warning")
            return
        if not self.is_screen_installed(name):
            self.install_screen(factory(), name=name)
        self.push_screen(name)

    async def action_quit(self) -> None:
        # Unsaved probe results count as much as marks: a clean quit deletes the recovery file.
        if self.dirty and self.wb is not None and (self.wb.marks or self.records.results or self.mix is not None
                                                    or self.records.extensions.get("sweeps")):
            def answer(yes: bool | None) -> None:
                if yes:
                    self._quit_clean()

            self.push_screen(ConfirmScreen("The session has unsaved changes. Quit anyway?", yes="Quit", no="Stay"),
                             answer)
            return
        self._quit_clean()

    def _quit_clean(self) -> None:
        self.recovery.discard()
        self.exit(0)

    # ------------------------------------------------------------ donors (from the donors screen)
    @work(thread=True, exit_on_error=False, group="donor")
    def open_donor(self, spec: str) -> None:
        from surgeon.core.donor import open_donor

        try:
            donor = open_donor(spec)
        except SurgeonError as e:
            self.post_message(Failed("Cannot add the donor", str(e)))
            return
        self.post_message(DonorOpened(donor, spec))

    @on(DonorOpened)
    def on_donor_opened(self, message: DonorOpened) -> None:
        try:
            if self.wb is None:
                self.wb = Workbench({"A": message.donor}, "A")
                name = "A"
            else:
                name = self.wb.add_donor(message.donor)
        except SurgeonError as e:
            self.push_screen(ErrorScreen("Cannot add the donor", str(e)))
            return
        self.labels[name] = _label(message.spec)
        self.start_hashing()
        problem = self.wb.problem(name)
        if problem:
            self.notify(problem, title=f"Donor {name} is incompatible with the base", severity="warning", timeout=10)
        else:
            self.notify(f"donor {name}: {message.spec}", timeout=3)
        self.workbench_changed(rebuild=True)

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


def run_app(dirs: list[str], session_path: str | None) -> int:
    """`moe-surgeon [DIR ...] [--session FILE]`: the workbench on DIRs, a session, or the demo."""
    from surgeon.live.threads import configure_threads

    configure_threads()  # a caller that starts here, not in cli.main, gets the same threads
    app = SurgeonApp(dirs, session_path)
    app.run()
    return app.return_code or 0
