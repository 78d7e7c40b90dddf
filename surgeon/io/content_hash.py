"""Full content hashes of files, computed once: cached per file by (device, inode, size, mtime_ns).

A sparse fingerprint (core/donor.py) is an identity, not a proof: a changed byte outside its samples
passes it. Anything the tool calls "verified" rests on these hashes instead.

The hash is XXH3-128 (the `xxhash` package) over 16 MiB chunks hashed in parallel, then over the
chunk digests and the size (`TreeHasher` computes the same from bytes as they are written, so an
export knows its shards' hashes without reading them back): on a 2-core machine it runs at the speed of reading the file from the page cache
(bench/hash.py), where SHA-256 takes about 5-8x and BLAKE3 about 2.5x as long. It detects any accidental change (a re-download, another revision, a flipped
bit); it is not meant to resist someone forging a file on purpose.

The cache is one JSON file in the user's cache directory. A hit costs a stat: a file whose size or
mtime changed gets a new key, so an edited file is read again. Its entries are keyed by what the
filesystem says identifies the file now; they never need invalidating by hand.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from surgeon.errors import SurgeonError
from surgeon.io.aligned import aligned_buffer
from surgeon.io.atomic import write_atomic
from surgeon.io.cache import cache_root
from surgeon.jobs import FOREGROUND, NEVER, CancelToken, Progress, Step

ALGORITHM = "xxh3-128-tree16m"  # says how it was computed, so another tool can recompute it
CHUNK = 1 << 24
READ = 1 << 20  # a chunk is read and hashed in pieces: 1 MiB of buffer per thread, not 16
WORKERS = 8
_lock = threading.Lock()


def cache_file() -> Path:
    return cache_root() / "content-hashes.json"


def _key(st: os.stat_result) -> str:
    return ":".join(map(str, identity(st)))


def identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What says a file is still the one that was hashed: (device, inode, size, mtime_ns, ctime_ns).
    mtime alone can be set back after an edit (`touch -r`, `rsync -t`, os.utime); ctime cannot: the
    kernel sets it on every change, the utime call included."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except OSError as e:
        raise SurgeonError(f"{path}: cannot read ({e.strerror})") from None


_memo: tuple[tuple, dict] | None = None  # (the cache file's stat key, its parsed content)


def _load() -> dict:
    """The cache's entries; parsed again only when the cache file changed (the workbench asks on
    every autosave, so a hit must not cost a parse)."""
    global _memo
    path = cache_file()
    try:
        st = path.stat()
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if _memo is not None and _memo[0] == key:
            return _memo[1]
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: recompute, never fail on the cache
    data = data if isinstance(data, dict) else {}
    _memo = (key, data)
    return data


def cached_hash(path: str | os.PathLike) -> str | None:
    """The file's hash if the cache has it for the file as it is now; never reads the file."""
    return cached_hashes([path])[0]


def cached_hashes(paths: list) -> list[str | None]:
    """`cached_hash` of each path, with the cache looked up once: the workbench asks for every
    shard of every donor on each autosave (322 for a pair of DeepSeek-V3 donors)."""
    entries = _load()
    out = []
    for path in paths:
        entry = entries.get(_key(_stat(Path(path))))
        out.append(entry.get("hash") if isinstance(entry, dict) else None)
    return out


def _still_there(key: str, entry) -> bool:
    """Drop entries of files that were deleted or have changed since: the cache stays the size of
    what is on disk."""
    try:
        return isinstance(entry, dict) and _key(Path(entry["path"]).stat()) == key
    except (OSError, KeyError, TypeError):
        return False


def _store(found: dict[str, dict]) -> None:
    with _lock:
        data = dict(_load())  # merge: another process may have hashed other files meanwhile
        data.update(found)
        data = {k: v for k, v in data.items() if _still_there(k, v)}
        try:
            write_atomic(cache_file(), (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), fsync=False)
        except OSError:
            pass  # an unwritable cache costs speed next time, never correctness


def _digest(path: Path, size: int, done_before: int, total: int, progress: Progress | None,
            cancel: CancelToken, started: float, background: bool = False) -> str:
    """XXH3-128 of each 16 MiB chunk, read and hashed on every core (xxhash lets go of the GIL),
    then XXH3-128 of the chunk digests in order and the size: one core cannot keep up with the page
    cache, and a hash of hashes changes with any changed byte just the same."""
    import xxhash  # only a full hash needs it

    local = threading.local()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise SurgeonError(f"{path}: cannot read ({e.strerror})") from None

    def chunk_digest(offset: int) -> bytes:
        # XXH3 streams: a chunk hashed piece by piece has the digest of the chunk hashed whole, so the
        # buffer (what the export's peak memory is mostly made of) stays small without changing the hash.
        if background:
            FOREGROUND.wait_idle(cancel)  # paused while a probe or another foreground job runs
        cancel.check()
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = aligned_buffer(READ)  # one buffer per thread, refilled: no allocation per piece
        h = xxhash.xxh3_128()
        end = min(offset + CHUNK, size)
        for at in range(offset, end, READ):
            want = min(READ, end - at)
            n = os.preadv(fd, [buf[:want]], at)
            if n != want:
                raise SurgeonError(f"{path}: changed while it was being hashed (short read at byte {at})")
            h.update(buf[:n])
        return h.digest()

    from concurrent.futures import ThreadPoolExecutor  # imported here: an export hashes as it writes, never here

    outer = xxhash.xxh3_128()
    try:
        with ThreadPoolExecutor(max_workers=min(WORKERS, os.cpu_count() or 1)) as pool:
            for k, digest in enumerate(pool.map(chunk_digest, range(0, size, CHUNK))):
                outer.update(digest)
                if progress is not None:
                    done = min(size, (k + 1) * CHUNK)
                    progress(Step(done_before + done, total, "bytes", "hashing", path.name, started))
    except OSError as e:
        raise SurgeonError(f"{path}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
    return _finish(outer, size)


def _finish(outer, size: int) -> str:
    """The content hash from the hash of the chunk digests so far: the size goes last."""
    outer.update(size.to_bytes(8, "little"))
    return f"{ALGORITHM}:{outer.hexdigest()}"


class TreeHasher:
    """The content hash of a file fed its bytes in order, in pieces of any size: what `hash_files`
    gives for a file of those bytes, without reading the file. A writer that hashes what it writes
    knows the hash when it closes the file; reading it back would cost a second pass over the disk."""

    def __init__(self) -> None:
        import xxhash

        self._outer = xxhash.xxh3_128()
        self._chunk = xxhash.xxh3_128()
        self._chunk_size = CHUNK
        self._in_chunk = 0  # bytes of the current chunk fed so far
        self.size = 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), self._chunk_size - self._in_chunk)
            self._chunk.update(view[:take])
            self._in_chunk += take
            self.size += take
            view = view[take:]
            if self._in_chunk == self._chunk_size:
                self._outer.update(self._chunk.digest())
                self._chunk.reset()
                self._in_chunk = 0

    def hexdigest(self) -> str:
        outer = self._outer.copy()  # copies: more bytes may follow
        if self._in_chunk:
            outer.update(self._chunk.digest())
        return _finish(outer, self.size)


def hash_files(paths, *, progress: Progress | None = None, cancel: CancelToken = NEVER,
               use_cache: bool = True, remember: bool = True, background: bool = False) -> dict[Path, str]:
    """Every file's full hash, from the cache where the file is unchanged (unless not `use_cache`),
    else by reading it; what was read goes into the cache unless not `remember` (files about to move).
    `background`: nobody waits for it, so it pauses between chunks while a foreground job runs
    (jobs.FOREGROUND); a job that needs the hash itself must not pass it, or it would wait on itself."""
    import time

    paths = [Path(p) for p in paths]
    stats = {p: _stat(p) for p in paths}
    cache = _load() if use_cache else {}
    out: dict[Path, str] = {}
    todo = []
    for p in paths:
        entry = cache.get(_key(stats[p]))
        if isinstance(entry, dict) and isinstance(entry.get("hash"), str):
            out[p] = entry["hash"]
        else:
            todo.append(p)
    total = sum(stats[p].st_size for p in todo)
    started, done = time.perf_counter(), 0
    found = {}
    for p in todo:
        out[p] = _digest(p, stats[p].st_size, done, total, progress, cancel, started, background)
        done += stats[p].st_size
        after = _stat(p)
        if _key(after) == _key(stats[p]):  # only a file that stayed put while read is worth caching
            found[_key(after)] = {"path": str(p.resolve()), "hash": out[p]}
    if found and remember:
        _store(found)
    return out


def hash_file(path: str | os.PathLike, **kwargs) -> str:
    return hash_files([path], **kwargs)[Path(path)]
