"""Full content hashes: any changed byte changes the hash; the cache answers for unchanged files only."""

import os

import pytest

from surgeon.errors import SurgeonError
from surgeon.io import content_hash as CH


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_SURGEON_CACHE", str(tmp_path / "cache"))


def write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_flipped_byte_anywhere_changes_the_hash(tmp_path, monkeypatch, where):
    monkeypatch.setattr(CH, "CHUNK", 4096)  # several chunks, so the tree of chunk digests is exercised
    data = bytearray(os.urandom(3 * 4096 + 123))
    f = write(tmp_path / "a.bin", bytes(data))
    before = CH.hash_file(f, use_cache=False)
    i = {"start": 0, "middle": len(data) // 2, "end": len(data) - 1}[where]
    data[i] ^= 1
    write(f, bytes(data))
    assert CH.hash_file(f, use_cache=False) != before


def test_same_bytes_same_hash_and_the_chunk_order_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(CH, "CHUNK", 4096)
    a, b = os.urandom(4096), os.urandom(4096)
    h1 = CH.hash_file(write(tmp_path / "x", a + b), use_cache=False)
    h2 = CH.hash_file(write(tmp_path / "y", a + b), use_cache=False)
    h3 = CH.hash_file(write(tmp_path / "z", b + a), use_cache=False)
    assert h1 == h2 != h3
    assert h1.startswith(CH.ALGORITHM + ":")


def test_the_cache_is_reused_for_an_unchanged_file(tmp_path, monkeypatch):
    f = write(tmp_path / "a.bin", os.urandom(10000))
    assert CH.cached_hash(f) is None
    h = CH.hash_file(f)
    assert CH.cached_hash(f) == h

    def no_reading(*args, **kwargs):
        raise AssertionError("an unchanged file was read again")

    monkeypatch.setattr(CH, "_digest", no_reading)
    assert CH.hash_file(f) == h
    with pytest.raises(AssertionError):
        CH.hash_file(f, use_cache=False)


def test_a_changed_size_or_mtime_invalidates_the_cache(tmp_path):
    f = write(tmp_path / "a.bin", b"x" * 5000)
    h = CH.hash_file(f)
    st = f.stat()
    # Same size, other bytes, mtime put back: the cache would lie, so the key includes mtime_ns...
    write(f, b"y" * 5000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert CH.cached_hash(f) is None
    assert CH.hash_file(f) != h
    # ...and size.
    write(f, b"y" * 5001)
    assert CH.cached_hash(f) is None


def test_an_edit_with_its_mtime_set_back_is_not_served_from_the_cache(tmp_path):
    """The attack on a cache keyed by mtime: change bytes in place (same size), then put the mtime back
    exactly, as `touch -r` or `rsync -t` would. ctime moved, so the old hash is not served."""
    f = write(tmp_path / "a.bin", b"x" * 5000)
    h = CH.hash_file(f)
    st = f.stat()
    with open(f, "r+b") as g:  # conv=notrunc: same file, same inode, same size
        g.seek(100)
        g.write(b"y")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns
    assert CH.cached_hash(f) is None
    assert CH.hash_file(f) != h


def test_a_damaged_cache_is_recomputed_not_an_error(tmp_path):
    f = write(tmp_path / "a.bin", b"abc")
    h = CH.hash_file(f)
    CH.cache_file().write_text("{not json")
    assert CH.hash_file(f) == h


def test_a_missing_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(SurgeonError, match="nope.bin"):
        CH.hash_file(tmp_path / "nope.bin")


def test_entries_of_deleted_files_are_dropped(tmp_path):
    a = write(tmp_path / "a.bin", b"a" * 100)
    b = write(tmp_path / "b.bin", b"b" * 100)
    CH.hash_file(a)
    a.unlink()
    CH.hash_file(b)
    text = CH.cache_file().read_text()
    assert "a.bin" not in text and "b.bin" in text


def test_the_hash_is_its_documented_definition(tmp_path, monkeypatch):
    """XXH3-128 of each whole 16 MiB chunk, then of the digests in order and the size: what another
    tool recomputes, and what sessions recorded, however the chunks are read (in 1 MiB pieces)."""
    import random

    import xxhash

    monkeypatch.setenv("MOE_SURGEON_CACHE", str(tmp_path / "cache"))
    data = random.Random(7).randbytes(CH.CHUNK + 3 * CH.READ + 12345)
    (tmp_path / "f.bin").write_bytes(data)
    outer = xxhash.xxh3_128()
    for at in range(0, len(data), CH.CHUNK):
        outer.update(xxhash.xxh3_128(data[at:at + CH.CHUNK]).digest())
    outer.update(len(data).to_bytes(8, "little"))
    assert CH.hash_file(tmp_path / "f.bin") == f"xxh3-128-tree16m:{outer.hexdigest()}"


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 2 * 4096, 3 * 4096 + 123])
def test_the_streaming_hash_equals_the_hash_of_the_file_however_its_bytes_arrive(tmp_path, monkeypatch, size):
    """An export hashes shards as it writes them and never reads them back: the manifest is only
    right if the streamed hash is the file's hash, for every size and every way of cutting it."""
    monkeypatch.setattr(CH, "CHUNK", 4096)  # many chunk borders, exact multiples and a last partial chunk
    data = os.urandom(size)
    want = CH.hash_file(write(tmp_path / "f.bin", data), use_cache=False)
    for pieces in (1, 7, 4096, 5000):
        h = CH.TreeHasher()
        for at in range(0, size, pieces):
            h.update(data[at:at + pieces])
        assert h.hexdigest() == want, pieces
    h = CH.TreeHasher()
    h.update(data[: size // 2])
    h.hexdigest()  # asking midway changes nothing that follows
    h.update(data[size // 2:])
    assert h.hexdigest() == want
