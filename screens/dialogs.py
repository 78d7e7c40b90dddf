"""Small modal dialogs: an error, a yes/no question, a path prompt.

Every user mistake the engine reports (SurgeonError) ends up in ErrorScreen or a notification,
never as a traceback on screen.
"""

from __future__ import annotations

import os
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.suggester import Suggester
from textual.validation import ValidationResult, Validator
from textual.widgets import Button, Input, Label, Static


class ErrorScreen(ModalScreen[None]):
    """A one-line engine message, shown until dismissed."""

    BINDINGS = [Binding("escape,enter,q", "dismiss", "Close")]

    def __init__(self, title: str, message: str):
        super().__init__()
        self.title_text = title
        self.message = message

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="error"):
            yield Label(self.title_text, id="dialog-title")
            yield Static(self.message, id="error-message", markup=False)
            yield Button("Close", id="close", variant="error")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)

    def action_dismiss(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str, yes: str = "Yes", no: str = "No"):
        super().__init__()
        self.question = question
        self.yes, self.no = yes, no

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(self.question, id="question", markup=False)
            with Horizontal(id="buttons"):
                yield Button(f"{self.yes} (y)", id="yes", variant="primary")
                yield Button(f"{self.no} (n)", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class PathSuggester(Suggester):
    """Completes the last path segment from what is on disk (directories first)."""

    def __init__(self, directories_only: bool = False):
        super().__init__(use_cache=False, case_sensitive=True)
        self.directories_only = directories_only

    async def get_suggestion(self, value: str) -> str | None:
        if not value:
            return None
        expanded = os.path.expanduser(value)
        parent, prefix = os.path.split(expanded)
        try:
            entries = sorted(os.scandir(parent or "."), key=lambda e: (not e.is_dir(), e.name))
        except OSError:
            return None
        for e in entries:
            if e.name.startswith(prefix) and e.name != prefix and not e.name.startswith("."):
                if self.directories_only and not e.is_dir():
                    continue
                return value[: len(value) - len(prefix)] + e.name + ("/" if e.is_dir() else "")
        return None


class ParentExists(Validator):
    def validate(self, value: str) -> ValidationResult:
        if not value.strip():
            return self.failure("enter a path")
        parent = Path(value).expanduser().absolute().parent
        if not parent.is_dir():
            return self.failure(f"{parent}: no such directory")
        return self.success()


class PathScreen(ModalScreen[str | None]):
    """Ask for a path; enter accepts, escape cancels. Returns None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, prompt: str, value: str = "", *, must_exist: bool = False):
        super().__init__()
        self.prompt = prompt
        self.value = value
        self.must_exist = must_exist

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.prompt, id="dialog-title")
            yield Input(self.value, id="path", suggester=PathSuggester(), validators=[ParentExists()])
            yield Static("", id="path-error")
            yield Static("enter: accept · tab/→: complete · escape: cancel", classes="hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        value = event.value.strip()
        error = self.query_one("#path-error", Static)
        if event.validation_result is not None and not event.validation_result.is_valid:
            error.update(event.validation_result.failure_descriptions[0])
            return
        if self.must_exist and not Path(value).expanduser().is_file():
            error.update(f"{value}: no such file")
            return
        self.dismiss(value)

    def action_cancel(self) -> None:
        self.dismiss(None)
