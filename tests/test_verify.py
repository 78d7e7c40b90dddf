"""An export's manifest and `moe-surgeon verify`: every flipped byte is found and named."""

import json
import shutil

import pytest
from tiny_models import flip_byte

from surgeon.core.donor import DEMO_ROOT
from surgeon.io.manifest import MANIFEST_FILE, build_manifest, write_manifest
from surgeon.io.safetensors_file import read_header


@pytest.fixture
def export_dir(tmp_path):
    """A checkpoint with a manifest whose every tensor comes from a copy of demo:base (donor A)."""
    donor = tmp_path / "donor"
    shutil.copytree(DEMO_ROOT / "base", donor)
    out = tmp_path / "out"
    shutil.copytree(donor, out)
    names = read_header(str(out / "model.safetensors")).tensors
    manifest = build_manifest(out, {n: {"donor": "A", "name": n} for n in names}, {"A": {"path": str(donor)}})
    write_manifest(out, manifest)
    return out, donor


def flip(path, offset):
    flip_byte(path, offset, 0x40)


def tensor_at(path, where):
    header = read_header(str(path))
    tensors = sorted(header.tensors.items(), key=lambda kv: kv[1].start)
    name, t = {"start": tensors[0], "middle": tensors[len(tensors) // 2], "end": tensors[-1]}[where]
    offset = {"start": t.start, "middle": (t.start + t.end) // 2, "end": t.end - 1}[where]
    return name, offset


def test_manifest_lists_every_tensor_with_its_source_shape_range_and_hash(export_dir):
    out, _ = export_dir
    m = json.loads((out / MANIFEST_FILE).read_text())
    header = read_header(str(out / "model.safetensors"))
    assert set(m["tensors"]) == set(header.tensors)
    name, t = next(iter(header.tensors.items()))
    entry = m["tensors"][name]
    assert entry["source"] == {"donor": "A", "name": name}
    assert entry["shape"] == list(t.shape) and entry["offsets"] == [t.start, t.end] and entry["dtype"] == t.dtype
    assert set(m["shards"]) == {"model.safetensors"}
    assert {"python", "safetensors", "xxhash"} <= set(m["libraries"])


def test_the_manifest_file_reads_back_as_written_one_line_per_tensor(export_dir):
    """Written in pieces (the C encoder per tensor): the text must still be the whole manifest."""
    out, donor = export_dir
    names = read_header(str(out / "model.safetensors")).tensors
    manifest = build_manifest(out, {n: {"donor": "A", "name": n} for n in names}, {"A": {"path": str(donor)}})
    text = (out / MANIFEST_FILE).read_text()
    assert json.loads(text) == manifest and list(json.loads(text)) == list(manifest)
    lines = [line for line in text.splitlines() if '"hash": ' in line and '"shard": ' in line]
    assert len(lines) == len(names)  # every tensor's entry on a line of its own
    name, entry = next(iter(json.loads("{" + lines[0].rstrip(",") + "}").items()))
    assert entry == manifest["tensors"][name]


def test_verify_passes_an_untouched_export_and_its_donor(export_dir, run_cli):
    out, _ = export_dir
    r = run_cli("verify", out, "--donors")
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout and "compared byte for byte" in r.stdout


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_verify_names_the_tensor_with_a_flipped_byte(export_dir, run_cli, where):
    out, _ = export_dir
    name, offset = tensor_at(out / "model.safetensors", where)
    flip(out / "model.safetensors", offset)
    r = run_cli("verify", out, "--json")
    assert r.returncode == 1
    problem = json.loads(r.stdout)["problem"]
    assert f"tensor {name} differs from the manifest" in problem


@pytest.mark.parametrize("where", ["start", "end"])
def test_verify_donors_names_the_tensor_whose_donor_changed(export_dir, run_cli, where):
    out, donor = export_dir
    name, offset = tensor_at(donor / "model.safetensors", where)
    flip(donor / "model.safetensors", offset)
    assert run_cli("verify", out).returncode == 0  # the export itself is intact
    r = run_cli("verify", out, "--donors")
    assert r.returncode == 1
    assert f"tensor {name} differs from donor A's {name}" in r.stdout


def test_verify_without_a_manifest_is_one_line(tmp_path, run_cli):
    shutil.copytree(DEMO_ROOT / "base", tmp_path / "plain")
    r = run_cli("verify", tmp_path / "plain")
    assert r.returncode == 2
    assert MANIFEST_FILE in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_verify_donors_with_relative_donor_paths_from_anywhere(tmp_path, run_cli):
    """The README's pattern: `export OUT --base D0 ...` with relative paths, then `verify OUT --donors`,
    from the same directory and from another one: the manifest says where each donor is from the export."""
    from tiny_models import make_donor

    work = tmp_path / "work"
    make_donor(work / "D0", "olmoe", seed=0)
    make_donor(work / "D1", "olmoe", seed=1)
    assert run_cli("export", "outr", "--base", "D0", "--take", "attention@0=D1", cwd=work).returncode == 0
    manifest = json.loads((work / "outr" / MANIFEST_FILE).read_text())
    assert manifest["donors"]["A"]["path"] == "D0" and manifest["donors"]["A"]["path_from_export"] == "../D0"
    r = run_cli("verify", "outr", "--donors", cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_cli("verify", work / "outr", "--donors", cwd=elsewhere)
    assert r.returncode == 0, r.stdout + r.stderr


def test_verify_checks_config_and_the_other_files(export_dir, run_cli):
    """config.json is in the manifest: an edited num_experts_per_tok is a changed model, not verified."""
    out, _ = export_dir
    assert "config.json" in json.loads((out / MANIFEST_FILE).read_text())["files"]
    config = json.loads((out / "config.json").read_text())
    config["num_experts_per_tok"] = config["num_experts_per_tok"] + 1
    (out / "config.json").write_text(json.dumps(config))
    r = run_cli("verify", out, "--json")
    assert r.returncode == 1
    assert "config.json: differs from the manifest" in json.loads(r.stdout)["problem"]
