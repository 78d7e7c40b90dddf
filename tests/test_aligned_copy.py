"""The buffers file bytes are read into (surgeon/io/aligned.py), and the export's copy through them:
page-aligned memory, bytes placed where the kernel copies them fastest, and an export whose bytes
are its donors' and whose manifest hashes are the hashes of those bytes, computed here apart."""

import ctypes
import json
import mmap

import pytest
import xxhash
from safetensors import safe_open

from surgeon.core.donor import open_donor
from surgeon.core.plan import Plan, parse_spec
from surgeon.core.resolve import resolve
from surgeon.features import export as export_module
from surgeon.features.export import export_hybrid
from surgeon.io import content_hash, manifest
from surgeon.io.aligned import PAGE, aligned_buffer, view_for
from surgeon.io.manifest import MANIFEST_FILE


def address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


@pytest.mark.parametrize("nbytes", [1, 1500, PAGE - 1, PAGE, PAGE + 1, (256 << 10) + PAGE, 3 << 20])
def test_an_aligned_buffer_starts_on_a_page_and_has_the_size_asked(nbytes):
    buf = aligned_buffer(nbytes)
    assert PAGE == mmap.PAGESIZE
    assert address(buf) % PAGE == 0
    assert len(buf) == nbytes and buf.nbytes == nbytes and not buf.readonly
    assert buf[0] == 0 and buf[-1] == 0
    buf[-1] = 7  # writable to its last byte
    assert buf[-1] == 7


@pytest.mark.parametrize("nbytes", [0, -1])
def test_an_empty_buffer_is_refused(nbytes):
    with pytest.raises(ValueError):
        aligned_buffer(nbytes)


def test_bytes_land_at_their_page_offset_and_never_just_behind_where_they_go():
    """view_for: a read copies whole pages (the bytes sit at their offset within a page in the file)
    unless the write that follows would then copy to 1-63 bytes ahead of its source within a page,
    the copy that ran up to 3.5x slower; then both copies are half a page apart."""
    buf = aligned_buffer((256 << 10) + PAGE)
    base = address(buf)
    shifted = 0
    for offset in (0, 8, 16, 1296, PAGE - 8, PAGE, 5 * PAGE + 1000):
        for to in (0, 8, 16, 63, 64, 1296, 1304, PAGE - 8, 12345):
            view = view_for(buf, offset, 256 << 10, to=to)
            at = address(view) - base
            assert len(view) == 256 << 10 and 0 <= at < PAGE
            read_ahead, write_ahead = (at - offset) % PAGE, (to - at) % PAGE
            assert not 0 < read_ahead < 64 and not 0 < write_ahead < 64, (offset, to)
            shifted += read_ahead != 0
        assert address(view_for(buf, offset, 10)) - base == offset % PAGE  # no write: always in place
    assert shifted  # the half-page move happened for some pairs (e.g. offset 0 to 8)
    with pytest.raises(ValueError):  # a buffer without the page to spare
        view_for(aligned_buffer(256 << 10), 8, 256 << 10)


@pytest.fixture
def small_pieces(monkeypatch):
    """Tensors copied and hashed in many pieces that are not a page multiple, so each piece lands at
    another place in the buffer."""
    monkeypatch.setattr(content_hash, "CHUNK", 4096)
    monkeypatch.setattr(content_hash, "READ", 1000)
    monkeypatch.setattr(manifest, "READ", 1000)
    monkeypatch.setattr(export_module, "COPY_BUFFER", 1500)


def donor_bytes(donor_dir, name, rows=None) -> bytes:
    """A donor tensor's bytes (rows [lo, hi) of its first axis), read by the safetensors library."""
    import torch

    index = donor_dir / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(str(donor_dir / shard), "pt") as f:
        t = f.get_tensor(name)
    if rows is not None:
        t = t[rows[0]:rows[1]]
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("pieces", ["default", "small"])
@pytest.mark.parametrize("family, spec", [("olmoe", "experts@0-1"), ("gpt_oss", "expert:1@1")])
def test_an_export_is_its_donors_bytes_and_its_manifest_hashes_them(moe_pair, tmp_path, request, pieces,
                                                                     family, spec):
    """Byte for byte: every output tensor is its donor's bytes (a fused expert tensor spliced from two
    donors' rows, for gpt-oss), and its manifest hash is XXH3-128 of those bytes computed here."""
    import torch

    if pieces == "small":
        request.getfixturevalue("small_pieces")
    a, b = moe_pair(family)
    dirs = {"A": a, "B": b}
    donors = {"A": open_donor(a), "B": open_donor(b)}
    resolution = resolve(Plan("A", [parse_spec(spec, "B")]), donors)
    assert any(s.donor == "B" or s.runs for s in resolution.sources.values())
    out = tmp_path / "out"
    export_hybrid(resolution, donors, out, max_shard_size=40_000)
    entries = json.loads((out / MANIFEST_FILE).read_text())["tensors"]
    assert set(entries) == set(resolution.sources)
    spliced = 0
    for name, src in resolution.sources.items():
        want = b"".join(donor_bytes(dirs[d], src.tensor, (lo, hi)) for lo, hi, d in src.runs) if src.runs \
            else donor_bytes(dirs[src.donor], src.tensor)
        spliced += bool(src.runs)
        with safe_open(str(out / entries[name]["shard"]), "pt") as f:
            got = f.get_tensor(name).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert got == want, name
        raw = (out / entries[name]["shard"]).read_bytes()
        start, end = entries[name]["offsets"]
        assert raw[start:end] == want, name
        assert entries[name]["hash"] == xxhash.xxh3_128(want).hexdigest(), name
    assert spliced or family == "olmoe"
