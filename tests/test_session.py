"""Sessions: saved atomically, validated on load, replayed to the same bytes, portable."""

import filecmp
import json
import shutil

from surgeon.core.donor import open_donor
from surgeon.core.plan import Plan, parse_spec
from surgeon.core.session import load_session, make_session, save_session


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
    assert r.returncode == 0 and "fingerprints verified" in r.stdout
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
