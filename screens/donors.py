"""Donors: add by path, remove, choose the base; what `inspect` shows and compatibility.

An incompatible donor stays listed with the reason (the tensor and both shapes, as resolve()
says it); the grid refuses to mark cells with it.
"""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.validation import ValidationResult, Validator
from textual.widgets import DataTable, Input, Static

from surgeon.errors import SurgeonError
from surgeon.io.sizes import human_bytes

from .dialogs import PathSuggester
from .widgets.grid import donor_style
from .widgets.keybar import KeyBar


class DonorPath(Validator):
    """A checkpoint directory: exists, is a directory, has config.json (or a demo: name)."""

    def validate(self, value: str) -> ValidationResult:
        value = value.strip()
        if not value:
            return self.failure("enter a checkpoint directory")
        if value.startswith("demo:"):
            return self.success()
        path = Path(value).expanduser()
        if not path.exists():
            return self.failure(f"{path}: no such directory")
        if not path.is_dir():
            return self.failure(f"{path}: not a directory")
        if not (path / "config.json").is_file():
            return self.failure(f"{path}: no config.json (not a Hugging Face checkpoint)")
        return self.success()


class DonorsScreen(Screen):
    CSS_PATH = "donors.tcss"  # its own rules; the shared ones are in app.tcss
    BINDINGS = [
        Binding("escape", "back", "Back", id="donors.back"),
        Binding("B", "make_base", "Make base", id="donors.base", tooltip="Make the selected donor the base"),
        Binding("delete,x", "remove", "Remove", id="donors.remove", key_display="del",
                tooltip="Remove the selected donor (its marks go back to the base)"),
        Binding("plus,insert", "focus_add", "Add", key_display="+", id="donors.add", tooltip="Type a path to add a donor"),
    ]

    def compose(self) -> ComposeResult:
        yield Static("[b]Donors[/b]: enter a path below to add one; B makes the selected donor the base", id="layer-title")
        yield DataTable(id="donor-table", cursor_type="row")
        yield Static("", id="donor-info", markup=False)
        yield Input(placeholder="checkpoint directory to add (tab completes)", id="donor-add",
                    suggester=PathSuggester(directories_only=True), validators=[DonorPath()], validate_on=["submitted"])
        yield Static("", classes="field-error", id="add-error")
        yield KeyBar()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("", "donor", "architecture", "layers", "experts", "dtype", "size", "fingerprint", "status")
        self.refresh_cells()
        table.focus()

    def refresh_cells(self) -> None:
        table = self.query_one(DataTable)
        wb = self.app.wb
        keep = table.cursor_row
        table.clear()
        if wb is None:
            self.query_one("#donor-info", Static).update("No donors yet: type a checkpoint directory below.")
            return
        for name, d in wb.donors.items():
            a = d.anatomy
            problem = wb.problem(name)
            status = Text("base", "bold") if name == wb.base else (
                Text("incompatible", "bold red") if problem else Text("compatible", "green"))
            table.add_row(Text(f" {name} ", donor_style(wb, name)), self.app.labels.get(name, d.path.name),
                          d.model_type, str(a.num_layers), str(a.num_experts or "-"), d.dtype,
                          human_bytes(d.total_bytes, 1), d.fingerprint[7:19], status, key=name)
        if keep < table.row_count:
            table.move_cursor(row=keep)
        self.show_info()

    def selected(self) -> str | None:
        table = self.query_one(DataTable)
        wb = self.app.wb
        if wb is None or not table.row_count:
            return None
        return list(wb.donors)[min(table.cursor_row, len(wb.donors) - 1)]

    def show_info(self) -> None:
        name = self.selected()
        info = self.query_one("#donor-info", Static)
        if name is None:
            info.update("")
            return
        wb = self.app.wb
        d = wb.donors[name]
        a = d.anatomy
        lines = [
            f"{name}  {d.path}",
            f"architecture  {d.model_type} ({', '.join(d.config.get('architectures', [])) or 'no architectures field'})"
            + ("" if a.known else "  [no table: components inferred from names]"),
            f"layers {a.num_layers}   experts {a.num_experts or 'none (dense)'} per layer   dtype {d.dtype}",
            f"parameters {d.num_parameters:,} in {len(d.tensors)} tensors, {human_bytes(d.total_bytes, 1)} "
            f"in {len(d.shards)} shard(s)",
            f"fingerprint {d.fingerprint}",
        ]
        if d.tied_embeddings:
            lines.append("lm_head tied to the embedding")
        if a.unclassified:
            lines.append(f"{len(a.unclassified)} unclassified tensor(s), always from the base")
        problem = wb.problem(name)
        if name == wb.base:
            lines.append("This is the base: every tensor comes from it unless marked.")
        elif problem:
            lines.append(f"Incompatible with base {wb.base}, cannot be marked: {problem}")
        else:
            lines.append(f"Compatible with base {wb.base}: every component can be taken from it.")
        info.update("\n".join(lines))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_info()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        error = self.query_one("#add-error", Static)
        if event.validation_result is not None and not event.validation_result.is_valid:
            error.update(event.validation_result.failure_descriptions[0])
            return
        error.update("")
        event.input.value = ""
        self.app.open_donor(event.value.strip())
        self.query_one(DataTable).focus()

    def action_focus_add(self) -> None:
        self.query_one("#donor-add", Input).focus()

    def action_make_base(self) -> None:
        name = self.selected()
        wb = self.app.wb
        if name is None or name == wb.base:
            return
        try:
            wb.set_base(name)
        except SurgeonError as e:
            self.notify(str(e), title=f"{name} cannot be the base", severity="error", timeout=10)
            return
        self.app.workbench_changed(rebuild=True)
        self.notify(f"donor {name} is the base", timeout=3)

    def action_remove(self) -> None:
        name = self.selected()
        wb = self.app.wb
        if name is None:
            return
        try:
            wb.remove_donor(name)
        except SurgeonError as e:
            self.notify(str(e), severity="error", timeout=6)
            return
        self.app.labels.pop(name, None)
        self.app.workbench_changed(rebuild=True)
        self.notify(f"removed donor {name}; its marks went back to the base (history cleared)", timeout=4)

    def action_back(self) -> None:
        self.app.pop_screen()
