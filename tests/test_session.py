"""Sessions: saved atomically, validated on load, replayed to the same bytes, portable."""

import filecmp
import json
import shutil
from pathlib import Path

import pytest

from surgeon.core.donor import open_donor
from surgeon.core.plan import Plan, parse_spec
from surgeon.core.session import ExportRecord, load_session, make_session, save_session
from surgeon.errors import SurgeonError


def same_weights(x, y):
    files = sorted(p.name for p in x.glob("*.safetensors"))
    assert files == sorted(p.name for p in y.glob("*.safetensors"))
    return all(filecmp.cmp(x / f, y / f, shallow=False) for f in files)


def test_round_trip_in_memory(donors_of, tmp_path):
    a, b = donors_of("qwen2_moe", 2)
    donors = {"A": open_donor(a), "B": open_donor(b)}
    plan = Plan("A", [parse_spec("expert:0,2@1", "B"), parse_spec("gate", "B"), parse_spec("attention@0", "A")])
    s = make_session(plan, donors, tmp_path / "s.json")
    save_session(s, tmp_path / "s.json")
    back = load_session(tmp_path / "s.json")
    assert back.plan == plan
    assert [(d.name, d.fingerprint, d.model_type) for d in back.donors] == [
        ("A", donors["A"].fingerprint, "qwen2_moe"), ("B", donors["B"].fingerprint, "qwen2_moe")]
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temporary left behind
    schema_keys = {"schema_version", "donors", "base", "plan", "probes", "results", "exports"}
    assert schema_keys <= set(json.loads((tmp_path / "s.json").read_text()))


def test_replay_exports_the_same_bytes(donors_of, tmp_path, cli):
    a, b, c = donors_of("olmoe", 3)[:3]
    session = tmp_path / "s.json"
    first = tmp_path / "first"
    r = cli("export", first, "--base", a, "--take", f"attention={b}", "--take", f"expert:3@1={c}",
            "--save-session", session)
    assert r.returncode == 0, r.stderr
    recorded = json.loads(session.read_text())
    assert recorded["exports"][0]["path"] == str(first)
    r = cli("replay", session)
    assert r.returncode == 0 and "donors verified" in r.stdout
    again = tmp_path / "again"
    r = cli("replay", session, "--export", again)
    assert r.returncode == 0, r.stderr
    assert same_weights(first, again)
    # the embedded session replays too, from inside the export
    r = cli("replay", again / "moe-surgeon-session.json", "--export", tmp_path / "third")
    assert r.returncode == 0, r.stderr
    assert same_weights(first, tmp_path / "third")


def test_session_travels_with_its_donors(donors_of, tmp_path, cli):
    src = donors_of("olmoe", 2)
    project = tmp_path / "project"
    shutil.copytree(src[0], project / "donors" / "a")
    shutil.copytree(src[1], project / "donors" / "b")
    r = cli("export", tmp_path / "out", "--base", project / "donors" / "a",
            "--take", f"router={project / 'donors' / 'b'}", "--save-session", project / "s.json")
    assert r.returncode == 0, r.stderr
    assert [d["path"] for d in json.loads((project / "s.json").read_text())["donors"]] == ["donors/a", "donors/b"]
    moved = tmp_path / "moved"
    shutil.move(project, moved)
    r = cli("replay", moved / "s.json", "--export", tmp_path / "out2")
    assert r.returncode == 0, r.stderr
    assert same_weights(tmp_path / "out", tmp_path / "out2")


def test_ignore_fingerprints_replays_a_changed_donor(donors_of, tmp_path, cli):
    src = donors_of("olmoe", 2)
    a, b = shutil.copytree(src[0], tmp_path / "a"), shutil.copytree(src[1], tmp_path / "b")
    session = tmp_path / "s.json"
    assert cli("export", tmp_path / "o1", "--base", a, "--take", f"router={b}", "--save-session", session).returncode == 0
    cfg = json.loads((b / "config.json").read_text())
    cfg["note"] = "edited"
    (b / "config.json").write_text(json.dumps(cfg))
    r = cli("replay", session)
    assert r.returncode == 2 and "config.json changed" in r.stderr
    r = cli("replay", session, "--ignore-fingerprints")
    assert r.returncode == 0 and "ignored" in r.stdout


def test_verify_hashes_content(donors_of, cli):
    a = donors_of("olmoe", 1)[0]
    r = cli("inspect", a, "--verify", "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout)["content_hash"].startswith("sha256:")


def test_fingerprints_tell_sibling_fine_tunes_apart(donors_of):
    """Same config, same header bytes, different weights: the fingerprint must still differ."""
    a, b = (open_donor(p) for p in donors_of("olmoe", 2))
    assert a.config_bytes == b.config_bytes
    assert [h.raw for h in a.shards.values()] == [h.raw for h in b.shards.values()]
    assert a.fingerprint != b.fingerprint


def test_atomic_write_keeps_an_ordinary_file_mode(tmp_path):
    from surgeon.io.atomic import write_atomic

    target = tmp_path / "s.json"
    write_atomic(target, b"{}")
    assert target.stat().st_mode & 0o777 == 0o644
    target.chmod(0o640)
    write_atomic(target, b"[]")
    assert target.stat().st_mode & 0o777 == 0o640 and target.read_bytes() == b"[]"


# ---------------------------------------------------------------- typed records, old files
DATA = Path(__file__).parent / "data"
OLD_FILES = [Path(__file__).parent.parent / "sessions" / "demo-transfer.json",
             DATA / "session-v1-export.json"]  # written by `export --save-session` before records were typed


@pytest.mark.parametrize("path", OLD_FILES, ids=lambda p: p.name)
def test_old_session_files_load_typed_and_write_back_unchanged(path, tmp_path):
    session = load_session(path)
    assert all(isinstance(r, ExportRecord) for r in session.exports)
    assert session.to_json() == json.loads(path.read_text())
    save_session(session, tmp_path / "again.json")  # and what it writes still validates
    assert load_session(tmp_path / "again.json").to_json() == session.to_json()


def test_an_old_export_record_is_typed():
    session = load_session(DATA / "session-v1-export.json")
    (record,) = session.exports
    assert (record.dtype, record.max_shard_size, record.shards, record.tensors, record.bytes) == (
        "keep", 100_000, 10, 135, 935_296)
    assert record.kind is None and record.extra == {}
    assert load_session(OLD_FILES[0]).exports == []


@pytest.mark.parametrize("record", [
    # the workbench's record before it recorded max_shard_size
    {"path": "/x/hybrid", "dtype": "keep", "shards": 1, "tensors": 135, "bytes": 935296, "time": "2026-11-23T12:00:00Z"},
    # a mix's record: a kind, and a key only mixes have, before the time
    {"path": "mix-1", "kind": "mix", "dtype": "keep", "max_shard_size": 5000000000, "shards": 1, "tensors": 60,
     "bytes": 1000, "routers_sha256": "sha256:ab", "time": "2026-11-23T12:00:00Z"},
])
def test_export_records_round_trip_key_for_key(record):
    typed = ExportRecord.from_json(record)
    assert list(typed.to_json().items()) == list(record.items())


def test_a_record_that_is_not_an_object_is_refused_by_field(tmp_path):
    data = json.loads((DATA / "session-v1-export.json").read_text())
    data["exports"].append("hybrid/")
    (tmp_path / "s.json").write_text(json.dumps(data))
    with pytest.raises(SurgeonError, match="field exports/1"):
        load_session(tmp_path / "s.json")
