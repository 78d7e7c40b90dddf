"""Opening donors and sessions for the app, off the UI thread.

Header reads of a sharded checkpoint can take a while on network storage, so donors, sessions and
a donor added from the Donors screen open in workers that only post messages; the handlers here
(on the UI thread) make what they opened the app's state. A worker's exception would be silent and
leave the app on "opening…", so every failure becomes a `Failed` message and an error dialog.
"""

from __future__ import annotations

import os
from pathlib import Path

from textual import work
from textual.message import Message

from surgeon.core import collector
from surgeon.core.plan import next_donor_name
from surgeon.core.recovery import load_recovery
from surgeon.core.session import SessionRecords
from surgeon.core.workbench import Workbench
from surgeon.errors import SurgeonError
from surgeon.io.fs import error_line

from .dialogs import ErrorScreen


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


def donor_label(spec: str) -> str:
    """What the grid calls a donor opened from `spec`: a demo's name, else its directory's."""
    return spec if spec.startswith("demo:") else (os.path.basename(os.path.normpath(spec)) or spec)


class LoadingMixin:
    """SurgeonApp's loading: its handlers are found by name on the MRO (a mixin's `@on` is not)."""

    def on_unmount(self) -> None:
        collector.let_go()  # what on_loaded froze and held: collectable again once the app has ended

    @work(thread=True, exit_on_error=False, group="load")
    def load_donors(self, specs: list[str], welcome: bool = False) -> None:
        try:
            self._load_donors(specs, welcome)
        except Exception as e:  # noqa: BLE001 - a worker's exception is silent: the app would wait forever
            self.post_message(Failed("Cannot open the donors", error_line(e)))

    def _load_donors(self, specs: list[str], welcome: bool) -> None:
        with collector.paused():  # tables of tens of thousands of entries: see surgeon/core/collector.py
            self._open_donors(specs, welcome)

    def _open_donors(self, specs: list[str], welcome: bool) -> None:
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
            labels[name] = donor_label(spec)
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
        labels = {d.name: (d.path if d.path.startswith("demo:") else (d.label or donor_label(d.path)))
                  for d in session.donors}
        if mix is not None:
            labels[mix.name] = donor_label(str(mix.export))
        records = SessionRecords.of(session)
        records.extensions = extensions
        recorded = {d.name: d.content_hashes for d in session.donors if d.content_hashes}
        self.post_message(Loaded(wb, labels, session_path=origin, records=records, dirty=bool(recovered),
                                 recovered_from=recovered, mix=mix, mix_pending=pending, note=note,
                                 recorded_hashes=recorded))

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
            if message.wb is not None:
                collector.keep_for_good()  # the donors' tables, skipped by the collector until the app ends
                collector.hold_full_collections()  # until nobody types (SurgeonApp._collect_when_idle)
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

    def on_failed(self, message: Failed) -> None:
        if not self.ready:
            self.ready = True
            self.surgery.show_empty("No session open. Press d to add a donor or ctrl+o to open a session.")
        self.push_screen(ErrorScreen(message.title, message.message))

    # ------------------------------------------------------------ a donor added from the Donors screen
    @work(thread=True, exit_on_error=False, group="donor")
    def open_donor(self, spec: str) -> None:
        from surgeon.core.donor import open_donor

        try:
            donor = open_donor(spec)
        except SurgeonError as e:
            self.post_message(Failed("Cannot add the donor", str(e)))
            return
        self.post_message(DonorOpened(donor, spec))

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
        self.labels[name] = donor_label(message.spec)
        self.start_hashing()
        problem = self.wb.problem(name)
        if problem:
            self.notify(problem, title=f"Donor {name} is incompatible with the base", severity="warning", timeout=10)
        else:
            self.notify(f"donor {name}: {message.spec}", timeout=3)
        self.workbench_changed(rebuild=True)
