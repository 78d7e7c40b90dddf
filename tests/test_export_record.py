"""One export use case: the command line and the workbench record the same thing in the session."""

import json

from test_tui_helpers import save_as, settle, sync
from textual.widgets import Input

from screens.app import SurgeonApp
from screens.export import ExportScreen


def without_times(session: dict) -> dict:
    session = dict(session, created=None)
    session["exports"] = [dict(r, time=None) for r in session["exports"]]
    return session


@sync
async def test_cli_and_workbench_write_the_same_export_record(donors_of, tmp_path, cli):
    a, b = (str(p) for p in donors_of("olmoe", 2))
    out = tmp_path / "hybrid"
    app = SurgeonApp([a, b], None, state_dir=tmp_path / "state", offer_recovery=False)
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(pilot)
        await pilot.press("2", "e")  # layer 0 attention from B, then the export dialog
        await pilot.pause()
        assert isinstance(app.screen, ExportScreen)
        app.screen.query_one("#export-out", Input).value = str(out)
        app.screen.query_one("#export-shard", Input).value = "40KB"
        await pilot.click("#export-start")
        await settle(pilot)
        assert not isinstance(app.screen, ExportScreen)
        await save_as(pilot, tmp_path / "tui.json")
    tui = json.loads((tmp_path / "tui.json").read_text())
    assert tui["plan"] == [{"component": "attention", "donor": "B", "layers": [0]}]

    r = cli("export", out, "--base", a, "--take", f"attention@0={b}", "--max-shard-size", "40KB", "--force",
            "--save-session", tmp_path / "cli.json")
    assert r.returncode == 0, r.stderr
    recorded = json.loads((tmp_path / "cli.json").read_text())
    assert recorded["exports"][0]["max_shard_size"] == 40_000 and recorded["exports"][0]["shards"] > 1
    assert without_times(tui) == without_times(recorded)
