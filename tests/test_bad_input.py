"""Every user mistake is one line on stderr naming the culprit, a non-zero exit, no traceback."""

import collections
import json
import shutil

import pytest


def assert_one_line_error(r, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("moe-surgeon: error: ")
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


@pytest.fixture
def pair(donors_of):
    return donors_of("olmoe", 4)


def test_missing_directory(run_cli, tmp_path):
    missing = tmp_path / "nope"
    assert_one_line_error(run_cli("inspect", missing), missing, "no such directory")


def test_a_real_process_prints_the_same_one_line_error_and_exits_2(cli, tmp_path):
    """The tests above call main() in-process; this one is the console entry point end to end."""
    missing = tmp_path / "nope"
    r = cli("inspect", missing)
    assert r.returncode == 2
    assert_one_line_error(r, missing, "no such directory")


def test_no_config(run_cli, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert_one_line_error(run_cli("inspect", tmp_path), tmp_path, "no config.json")


@pytest.mark.parametrize(
    "spec, needles",
    [
        ("attnetion", ["attnetion", "unknown component"]),
        ("experts@7", ["layer 7 out of range", "2 layers"]),
        ("expert:9@0", ["expert 9 out of range", "4 experts"]),
        ("expert:x", ["bad expert 'x'"]),
        ("shared_expert", ["has no shared_expert"]),
        ("embedding@0", ["global"]),
    ],
)
def test_bad_spec(run_cli, pair, tmp_path, spec, needles):
    r = run_cli("export", tmp_path / "out", "--base", pair[0], "--take", f"{spec}={pair[1]}")
    assert_one_line_error(r, spec, *needles)
    assert not (tmp_path / "out").exists()


def test_mismatched_shapes(run_cli, pair, tmp_path):
    from tiny_models import make_donor

    wide = make_donor(tmp_path / "wide", "olmoe", seed=5, hidden_size=48)
    r = run_cli("export", tmp_path / "out", "--base", pair[0], "--take", f"attention={wide}")
    assert_one_line_error(r, "shape [48]", "[32]", "self_attn", str(wide))


def test_mismatched_expert_count(run_cli, pair, tmp_path):
    from tiny_models import make_donor

    eight = make_donor(tmp_path / "eight", "olmoe", seed=5, num_experts=8)
    r = run_cli("export", tmp_path / "out", "--base", pair[0], "--take", f"experts={eight}")
    assert_one_line_error(r, "8 experts", "has 4", str(eight))


def copy_donor(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard(run_cli, pair, tmp_path):
    d = copy_donor(pair[1], tmp_path / "trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert_one_line_error(run_cli("inspect", d), "truncated shard", "model.safetensors")


def test_corrupted_header(run_cli, pair, tmp_path):
    d = copy_donor(pair[1], tmp_path / "corrupt")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"#garbage###!"
    f.write_bytes(bytes(data))
    assert_one_line_error(run_cli("inspect", d), "corrupted safetensors header", str(f))


def test_header_length_beyond_file(run_cli, tmp_path, pair):
    d = copy_donor(pair[1], tmp_path / "huge")
    f = d / "model.safetensors"
    f.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    assert_one_line_error(run_cli("inspect", d), "corrupted safetensors header", str(f))


def test_index_names_missing_shard(run_cli, tmp_path):
    from tiny_models import make_donor

    d = make_donor(tmp_path / "sharded", "olmoe", seed=0, max_shard_size="20KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (d / victim).unlink()
    assert_one_line_error(run_cli("inspect", d), "names shard", victim)


def test_pickle_only_refused_then_loaded_with_flag(run_cli, pair, tmp_path):
    import torch
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(pair[1] / "config.json", d / "config.json")
    state = load_file(pair[1] / "model.safetensors")
    torch.save(state, d / "pytorch_model.bin")
    assert_one_line_error(run_cli("inspect", d), "pickle-only", "--allow-pickle", "pytorch_model.bin")

    out = tmp_path / "out"
    r = run_cli("export", out, "--base", pair[0], "--take", f"attention={d}", "--allow-pickle")
    assert r.returncode == 0, r.stderr
    got = load_file(out / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(got[name], state[name])


class NotAWeight:
    pass


@pytest.mark.parametrize("payload, needle", [
    (NotAWeight(), "weights_only=True"),  # a class weights_only refuses to unpickle
    (collections.Counter(a=1), "entry x is a Counter"),  # allowed by weights_only, still no tensor
])
def test_pickle_that_is_not_a_state_dict(run_cli, pair, tmp_path, payload, needle):
    import torch

    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(pair[1] / "config.json", d / "config.json")
    torch.save({"w": torch.zeros(1), "x": payload}, d / "pytorch_model.bin")
    assert_one_line_error(run_cli("inspect", d, "--allow-pickle"), needle, "pytorch_model.bin")


def save_session(run_cli, pair, tmp_path, name="s.json"):
    session = tmp_path / name
    r = run_cli("export", tmp_path / "first", "--base", pair[0], "--take", f"experts@1={pair[1]}",
            "--save-session", session)
    assert r.returncode == 0, r.stderr
    return session


def test_session_of_newer_schema(run_cli, pair, tmp_path):
    session = save_session(run_cli, pair, tmp_path)
    data = json.loads(session.read_text())
    data["schema_version"] = 2
    session.write_text(json.dumps(data))
    assert_one_line_error(run_cli("replay", session), str(session), "schema_version 2", "newer")


def test_session_with_bad_field(run_cli, pair, tmp_path):
    session = save_session(run_cli, pair, tmp_path)
    data = json.loads(session.read_text())
    data["plan"][0]["component"] = "brains"
    session.write_text(json.dumps(data))
    assert_one_line_error(run_cli("replay", session), str(session), "field plan/0/component")


def test_session_not_json(run_cli, tmp_path):
    session = tmp_path / "broken.json"
    session.write_text("{ nope")
    assert_one_line_error(run_cli("replay", session), str(session), "not valid JSON")


def test_session_whose_donor_changed(run_cli, tmp_path, donors_of):
    src = donors_of("olmoe", 2)
    pair = [copy_donor(src[0], tmp_path / "a"), copy_donor(src[1], tmp_path / "b")]
    session = save_session(run_cli, pair, tmp_path)
    from tiny_models import make_donor

    shutil.rmtree(pair[1])
    make_donor(pair[1], "olmoe", seed=1, intermediate_size=24)  # same path, other weights
    r = run_cli("replay", session, "--export", tmp_path / "again")
    assert_one_line_error(r, "donor B", str(pair[1]), "shard model.safetensors changed", "--ignore-fingerprints")
    assert not (tmp_path / "again").exists()


def test_export_refuses_non_empty_target_and_target_inside_donor(run_cli, pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(run_cli("export", out, "--base", pair[0]), str(out), "not empty", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    assert_one_line_error(run_cli("export", pair[1] / "sub", "--base", pair[0], "--take", f"router={pair[1]}"),
                          "inside donor B")


def test_bad_take_and_dtype_and_shard_size(run_cli, pair, tmp_path):
    assert_one_line_error(run_cli("export", tmp_path / "o", "--base", pair[0], "--take", "attention"), "SPEC=DIR")
    assert_one_line_error(run_cli("export", tmp_path / "o", "--base", pair[0], "--max-shard-size", "lots"),
                          "--max-shard-size")


def test_dtype_mismatch_needs_dtype(run_cli, pair, tmp_path):
    import torch
    from tiny_models import make_donor

    half = make_donor(tmp_path / "bf16", "olmoe", seed=3, dtype=torch.bfloat16)
    r = run_cli("export", tmp_path / "o", "--base", pair[0], "--take", f"attention={half}")
    assert_one_line_error(r, "dtype BF16", "F32", "--dtype")
