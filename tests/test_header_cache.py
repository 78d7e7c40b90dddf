"""Headers already checked are kept on disk by their exact bytes (surgeon/io/header_cache.py): a
large header is read back from there, a damaged entry is ignored, and a changed header is never
served from an entry made for the old one."""

import struct

import pytest

from surgeon.io import header_cache, safetensors_file
from surgeon.io.safetensors_file import encode_header, read_header


def write_shard(path, n, dtype="F32"):
    """A shard of `n` small tensors, enough to be kept (header_cache.MIN_TENSORS)."""
    entries = [(f"model.layers.{i // 8}.mlp.experts.{i % 8}.w.weight", dtype, (2, 2)) for i in range(n)]
    header, _ = encode_header(entries, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + n * 4 * 4)
    return path


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_SURGEON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(safetensors_file, "_CHECKED", {})  # nothing remembered in this process
    return tmp_path


def kept(root):
    return sorted((root / "cache" / "headers").glob("*.bin"))


def test_a_large_header_is_kept_and_read_back_the_same(fresh):
    shard = write_shard(fresh / "big.safetensors", 400)
    first = read_header(str(shard))
    assert len(kept(fresh)) == 1
    safetensors_file._CHECKED.clear()
    again = read_header(str(shard))
    assert again.tensors == first.tensors and again.metadata == first.metadata

    small = write_shard(fresh / "small.safetensors", 10)
    read_header(str(small))
    assert len(kept(fresh)) == 1  # small headers parse faster than a cache file opens


def test_the_kept_entry_is_what_is_read(fresh):
    """Proof that the second read comes from the entry: an entry rewritten (with a valid digest) to
    say another dtype is what read_header returns. Only moe-surgeon writes these entries."""
    shard = write_shard(fresh / "big.safetensors", 400)
    read_header(str(shard))
    safetensors_file._CHECKED.clear()
    size, _, raw = safetensors_file._read_raw(str(shard))
    metadata, entries = header_cache.load(raw, size)
    tensors = {name: safetensors_file.TensorInfo("x", "I32", shape, start, end) for name, _, shape, start, end in entries}
    header_cache.store(raw, size, metadata, tensors)
    assert {t.dtype for t in read_header(str(shard)).tensors.values()} == {"I32"}


def test_a_damaged_entry_is_ignored(fresh):
    shard = write_shard(fresh / "big.safetensors", 400)
    first = read_header(str(shard))
    (entry,) = kept(fresh)
    data = bytearray(entry.read_bytes())
    data[100] ^= 0xFF
    entry.write_bytes(bytes(data))
    safetensors_file._CHECKED.clear()
    assert read_header(str(shard)).tensors == first.tensors  # parsed again, from the header itself
    entry.write_bytes(data[:50])  # truncated
    safetensors_file._CHECKED.clear()
    assert read_header(str(shard)).tensors == first.tensors


def test_a_changed_header_is_checked_again(fresh):
    """A shard whose header changes (here: one tensor's dtype, the same length) gets a new key; the
    old entry, still on disk, is never used for it."""
    shard = write_shard(fresh / "big.safetensors", 400)
    read_header(str(shard))
    data = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    at = data.index(b'"F32"', 8, 8 + n)
    data[at:at + 5] = b'"I32"'
    shard.write_bytes(bytes(data))
    safetensors_file._CHECKED.clear()
    dtypes = [t.dtype for t in read_header(str(shard)).tensors.values()]
    assert dtypes.count("I32") == 1 and len(kept(fresh)) == 2
