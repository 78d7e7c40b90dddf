"""Saving the app's session: ctrl+s and ctrl+o, the autosave to the recovery file, the offer to
restore after a crash, and quitting without losing unsaved work.

Every edit autosaves (in a worker) to this process's recovery file (surgeon/core/recovery.py); a clean
quit deletes it, so one whose process is gone, found at a start with the same donors, is work that a
crash lost.
"""

from __future__ import annotations

import time

from textual import work

from surgeon.core.recovery import orphans
from surgeon.errors import SurgeonError

from .dialogs import ConfirmScreen, ErrorScreen, PathScreen


class SavingMixin:
    """SurgeonApp's saving; state: `session_path`, `dirty`, `recovery` (a RecoveryWriter) and
    `_generation` (the autosave's counter, so an older write never replaces a newer one)."""

    def session_builder(self, session_path: str | None):
        """The session as it is now, as a function that makes its JSON and may run on any thread:
        the grid's plan, the labels and the records (their lists copied) are taken here; the donors'
        known content hashes (a stat per shard) and the JSON are made when it is called. For a
        DeepSeek-V3 pair those were 4.5 ms of every mark's handler, made on the UI thread."""
        from surgeon.core.session import SessionRecords, make_session

        # While the grid is the plain mix, the session is its recipe (what `mix --session` writes).
        mixed = self.mix is not None and self.mix.matches(self.wb)
        mix_session = self.mix.session(session_path) if mixed else None
        plan, donors = (None, None) if mixed else (self.wb.plan(), dict(self.wb.donors))
        labels, r = dict(self.labels), self.records
        records = SessionRecords(list(r.probes), list(r.results), list(r.exports), dict(r.extensions), r.created,
                                 r.trust_task_code)

        def build() -> dict:
            session = mix_session if mixed else make_session(plan, donors, session_path)
            recipe = session.extensions.get("mix")
            for ref in session.donors:
                ref.label = labels.get(ref.name, ref.label)
            records.fill(session)
            if mixed:
                session.extensions = {**session.extensions, "mix": recipe}
            return session.to_json()

        return build

    def session_json(self, session_path: str | None) -> dict:
        return self.session_builder(session_path)()

    def autosave(self) -> None:
        if self.wb is None:
            return
        self._generation += 1
        self._write_recovery(self._generation, self.session_builder(None), self.session_path)

    @work(thread=True, exit_on_error=False, group="autosave")
    def _write_recovery(self, generation: int, build, session_path: str | None) -> None:
        try:
            self.recovery.write(generation, build(), session_path)
        except (OSError, SurgeonError) as e:  # SurgeonError: a shard that went away names itself
            self.call_from_thread(self.notify, f"autosave failed: {e}", severity="error")

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
