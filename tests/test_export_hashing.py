"""An export hashes its shards while writing them: its manifest must be exactly what reading the
written files gives, and no shard is read back unless something changed it after it was written."""

import json

import pytest
import torch
from tiny_models import flip_byte

from surgeon.core.donor import open_donor
from surgeon.core.gates_sidecar import GATES_FILE, write_gates
from surgeon.core.plan import Plan, parse_spec
from surgeon.core.resolve import resolve
from surgeon.features import export as export_module
from surgeon.features.export import export_hybrid
from surgeon.features.verify import run_verify
from surgeon.io import content_hash, manifest
from surgeon.io.manifest import MANIFEST_FILE, build_manifest, tensor_hashes
from surgeon.io.safetensors_file import read_header


@pytest.fixture
def small_pieces(monkeypatch):
    """Tiny donors are smaller than one 16 MiB chunk and one copy buffer: shrink both, so the chunk
    tree and a tensor copied in several pieces through the buffer are exercised."""
    monkeypatch.setattr(content_hash, "CHUNK", 4096)
    monkeypatch.setattr(content_hash, "READ", 1000)
    monkeypatch.setattr(manifest, "READ", 1000)
    monkeypatch.setattr(export_module, "COPY_BUFFER", 1500)


def from_disk(out):
    """The manifest's hashes as reading every file gives them (no hashes passed in)."""
    m = build_manifest(out, {}, {})
    return m["shards"], {n: e["hash"] for n, e in m["tensors"].items()}


def written(out):
    m = json.loads((out / MANIFEST_FILE).read_text())
    return m["shards"], {n: e["hash"] for n, e in m["tensors"].items()}


def donors_and_resolution(a, b, spec="experts", dtype="keep"):
    donors = {"A": open_donor(a), "B": open_donor(b)}
    return resolve(Plan("A", [parse_spec(spec, "B")]), donors, dtype=dtype), donors


@pytest.mark.parametrize("dtype", ["keep", "float16"])
def test_the_manifest_written_while_exporting_equals_the_one_read_from_disk(donors_of, tmp_path, small_pieces, dtype):
    a, b = donors_of("olmoe", 2)
    resolution, donors = donors_and_resolution(a, b, dtype=dtype)
    out = tmp_path / "out"
    export_hybrid(resolution, donors, out, dtype=dtype, max_shard_size=30_000)
    shards, tensors = written(out)
    assert len(shards) > 1  # several shards, so each shard's hashes start afresh
    assert (shards, tensors) == from_disk(out)
    assert set(tensors) == set(resolution.sources)
    if dtype == "float16":  # converted bytes went through the hashers too
        assert {t.dtype for s in shards for t in read_header(str(out / s)).tensors.values()} == {"F16"}


def test_an_export_reads_none_of_its_shards_back(donors_of, tmp_path, monkeypatch):
    a, b = donors_of("olmoe", 2)
    resolution, donors = donors_and_resolution(a, b)

    def no_reading(*args, **kwargs):
        raise AssertionError("a shard the export wrote was read back to hash it")

    monkeypatch.setattr(content_hash, "_digest", no_reading)
    monkeypatch.setattr(manifest, "tensor_hashes", no_reading)
    export_hybrid(resolution, donors, tmp_path / "out", max_shard_size=30_000)
    monkeypatch.undo()
    assert written(tmp_path / "out") == from_disk(tmp_path / "out")


def _rewrite_in_place(tmp):
    """A same-size change right after writing, within the clock tick of the shard's own mtime."""
    shard = min(tmp.glob("model*.safetensors"))
    t = max(read_header(str(shard)).tensors.values(), key=lambda t: t.nbytes)
    flip_byte(shard, (t.start + t.end) // 2, 0x40)


def _add_gates(tmp):
    """As `gates add` does: a safetensors file the export never wrote."""
    hidden = json.loads((tmp / "config.json").read_text())["hidden_size"]
    write_gates(tmp, {1: torch.full((hidden,), 0.5)}, hidden)


@pytest.mark.parametrize("change", [_rewrite_in_place, _add_gates])
def test_files_before_rename_changes_or_adds_are_hashed_from_disk(donors_of, tmp_path, small_pieces, change):
    a, b = donors_of("olmoe", 2)
    resolution, donors = donors_and_resolution(a, b)
    untouched = tmp_path / "untouched"
    export_hybrid(resolution, donors, untouched, max_shard_size=30_000)
    out = tmp_path / "out"
    export_hybrid(resolution, donors, out, max_shard_size=30_000, before_rename=change)
    assert written(out) == from_disk(out)
    shards, tensors = written(out)
    before_shards, before_tensors = written(untouched)
    if change is _add_gates:
        assert set(shards) - set(before_shards) == {GATES_FILE}
        assert {k: v for k, v in shards.items() if k != GATES_FILE} == before_shards
    else:
        changed = [n for n in shards if shards[n] != before_shards[n]]
        assert len(changed) == 1 and len([n for n in tensors if tensors[n] != before_tensors[n]]) == 1
    assert run_verify(out).problem is None


def test_verify_passes_an_export_and_names_a_flipped_byte(donors_of, tmp_path):
    a, b = donors_of("olmoe", 2)
    resolution, donors = donors_and_resolution(a, b)
    out = tmp_path / "out"
    export_hybrid(resolution, donors, out)
    assert run_verify(out).problem is None
    shard = out / "model.safetensors"
    name, t = sorted(read_header(str(shard)).tensors.items(), key=lambda kv: kv[1].start)[5]
    flip_byte(shard, t.start + 1)
    problem = run_verify(out).problem
    assert problem is not None and f"tensor {name} differs" in problem


def test_tensor_hashes_of_tensors_larger_than_the_read_buffer(tmp_path, monkeypatch):
    import xxhash
    from safetensors.torch import save_file

    monkeypatch.setattr(manifest, "READ", 1000)
    tensors = {"a": torch.randn(1001), "b": torch.randn(10), "c": torch.randn(250)}  # 4004, 40, 1000 bytes
    save_file(tensors, tmp_path / "x.safetensors")
    want = {n: xxhash.xxh3_128(t.numpy().tobytes()).hexdigest() for n, t in tensors.items()}
    assert tensor_hashes(tmp_path / "x.safetensors") == want
