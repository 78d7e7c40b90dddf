"""Replay proves its donors by full content hashes, names what changed, and says when it cannot;
every export carries a manifest and a provenance table; the workbench verifies what it exports."""

import json
import shutil

import pytest
from test_tui_helpers import notifications, settle, sync
from textual.widgets import Input
from tiny_models import flip_byte

from screens.app import SurgeonApp
from screens.export import ExportScreen
from surgeon.core.donor import DEMO_ROOT
from surgeon.io.manifest import MANIFEST_FILE
from surgeon.io.safetensors_file import read_header

DATA = __import__("pathlib").Path(__file__).parent / "data"


def flip(path, offset):
    flip_byte(path, offset, 0x01)


@pytest.fixture
def exported(tmp_path, run_cli):
    """A copy of demo:arith as base A (all but layer 0's attention exported from it), a session
    saved by `export --save-session`, and the export with its manifest."""
    donor = tmp_path / "arith"
    shutil.copytree(DEMO_ROOT / "arith", donor)
    r = run_cli("export", tmp_path / "out", "--base", donor, "--take", "attention@0=demo:reverse",
                "--save-session", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    return donor, tmp_path / "s.json", tmp_path / "out"


def test_a_saved_session_records_full_hashes_and_replay_says_verified(exported, run_cli):
    donor, session, out = exported
    refs = json.loads(session.read_text())["donors"]
    assert all(set(ref["content_hashes"]) == {"model.safetensors"} for ref in refs)
    r = run_cli("replay", session, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["fingerprints"] == "verified" and "every byte" in summary["donor_check"]
    assert json.loads(session.read_text())["exports"][0]["manifest"] == MANIFEST_FILE


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_replay_refuses_a_flipped_byte_naming_donor_shard_and_tensor(exported, run_cli, where):
    donor, session, _ = exported
    shard = donor / "model.safetensors"
    copied = sorted((t for n, t in read_header(str(shard)).tensors.items()
                     if not (n.startswith("model.layers.0.self_attn."))), key=lambda t: t.start)
    tensors = {t.start: n for n, t in read_header(str(shard)).tensors.items()}
    t = {"start": copied[0], "middle": copied[len(copied) // 2], "end": copied[-1]}[where]
    offset = {"start": t.start, "middle": (t.start + t.end) // 2, "end": t.end - 1}[where]
    flip(shard, offset)
    r = run_cli("replay", session, "--export", donor.parent / "again")
    assert r.returncode == 2
    assert "donor A" in r.stderr and "shard model.safetensors changed" in r.stderr
    assert f"first differing tensor: {tensors[t.start]}" in r.stderr
    assert [line for line in r.stderr.splitlines() if "error" in line] == [r.stderr.splitlines()[-1]]
    assert not (donor.parent / "again").exists()


def test_replay_ignoring_fingerprints_says_so_and_records_it_in_the_export(exported, run_cli):
    donor, session, _ = exported
    flip(donor / "model.safetensors", read_header(str(donor / "model.safetensors")).tensors[
        "model.norm.weight"].start)
    r = run_cli("replay", session, "--ignore-fingerprints", "--export", donor.parent / "again")
    assert r.returncode == 0, r.stderr
    assert "verified" not in r.stdout + r.stderr and "not checked" in r.stderr
    embedded = json.loads((donor.parent / "again" / "moe-surgeon-session.json").read_text())
    assert embedded["extensions"]["replay"] == {"session": str(session), "donors": "ignored"}


def test_an_old_session_is_checked_sparsely_and_upgraded_when_saved_again(tmp_path, run_cli):
    old = tmp_path / "old.json"
    shutil.copy(DATA / "session-v1-export.json", old)  # written before full hashes existed
    r = run_cli("replay", old)
    assert r.returncode == 0, r.stderr
    assert "sparse fingerprint only" in r.stdout and "verified" not in r.stdout

    @sync
    async def resave():
        app = SurgeonApp(None, str(old), state_dir=tmp_path / "state", offer_recovery=False)
        async with app.run_test(size=(100, 32)) as pilot:
            await settle(pilot)  # the background hashing of the open donors finishes
            await pilot.press("ctrl+s")  # saves over the session it opened
            await settle(pilot)

    resave()
    refs = json.loads(old.read_text())["donors"]
    assert all(ref.get("content_hashes") for ref in refs)
    r = run_cli("replay", old)
    assert r.returncode == 0 and "donors verified" in r.stdout


def test_the_model_card_traces_each_component_to_its_donor(exported):
    _, _, out = exported
    card = (out / "README.md").read_text()
    assert "## Provenance by component" in card
    row = next(line for line in card.splitlines() if line.startswith("| attention |"))
    # 4 layers, one of them from B: a quarter of attention's parameters
    assert row.split("|")[2:4] == [" 75.0% ", " 25.0% "]
    assert "xxh3-128-tree16m:" in card.split("## Donor content hashes")[1]


def test_verify_finds_a_flipped_byte_in_a_real_export(exported, run_cli):
    _, _, out = exported
    assert run_cli("verify", out, "--donors").returncode == 0
    t = read_header(str(out / "model.safetensors")).tensors["model.layers.2.mlp.gate.weight"]
    flip(out / "model.safetensors", t.start + 3)
    r = run_cli("verify", out)
    assert r.returncode == 1 and "tensor model.layers.2.mlp.gate.weight differs" in r.stdout


@sync
async def test_the_workbench_verifies_the_export_it_just_made(tmp_path):
    app = SurgeonApp(["demo:arith", "demo:reverse"], None, state_dir=tmp_path / "state", offer_recovery=False)
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(pilot)
        await pilot.press("2", "e")
        await pilot.pause()
        assert isinstance(app.screen, ExportScreen)
        app.screen.query_one("#export-out", Input).value = str(tmp_path / "out")
        await pilot.click("#export-start")
        await settle(pilot)
        assert any("verified: every byte matches its manifest" in n for n in notifications(app))
    assert (tmp_path / "out" / MANIFEST_FILE).is_file()


@sync
async def test_the_hashings_last_message_after_the_screen_is_gone_is_no_traceback(tmp_path):
    # Quitting as the background hash ends: its last message can reach the grid's screen after the
    # app has taken its widgets down. Seen as a traceback on the way out; now nothing happens.
    from screens.app_hashing import Hashing

    app = SurgeonApp(["demo:arith", "demo:reverse"], None, state_dir=tmp_path / "state", offer_recovery=False)
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(pilot)
        await app.surgery.query("#legend, #status").remove()
        app.post_message(Hashing(None, done={}))
        await pilot.pause()
        assert app.hash_status is None  # the message was handled
    assert app.return_code in (None, 0)


@sync
async def test_quitting_or_reopening_stops_the_background_hashing(tmp_path):
    # Two 7B donors take minutes to hash: a quit that waited for the hashing thread would hang.
    app = SurgeonApp(["demo:arith", "demo:reverse"], None, state_dir=tmp_path / "state", offer_recovery=False)
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(pilot)
        first = app.hash_token
        app.start_hashing()  # what opening another donor set does
        assert first.cancelled and not app.hash_token.cancelled
        running = app.hash_token
        await settle(pilot)
    assert running.cancelled
