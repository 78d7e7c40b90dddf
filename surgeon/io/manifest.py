"""An export's manifest: what every output tensor is, where it came from, and the hash of its bytes.

Written beside the shards (`moe-surgeon-manifest.json`) inside the staged directory, so it appears
with the export or not at all. `check_manifest` re-reads an export and names the first tensor whose
bytes no longer match; `surgeon.features.verify` builds the `verify` command on it.

Tensor hashes are XXH3-128 of the tensor's bytes; shard hashes are the content hashes of
io/content_hash.py (so a later open of the same file costs a stat). An export hashes its shards as
it writes them (`ShardHashes`), so building its manifest reads from disk only the files that
changed after they were written, or that it was told nothing about.
"""

from __future__ import annotations

import json
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path

from surgeon.errors import SurgeonError
from surgeon.io.aligned import PAGE, aligned_buffer, view_for
from surgeon.io.content_hash import ALGORITHM, READ, TreeHasher, cached_hash, hash_files, identity
from surgeon.io.safetensors_file import read_header
from surgeon.io.versions import installed_versions
from surgeon.jobs import NEVER, CancelToken

MANIFEST_FILE = "moe-surgeon-manifest.json"
MANIFEST_VERSION = 1
TENSOR_HASH = "xxh3-128"
_LIBRARIES = ("moe-surgeon", "safetensors", "torch", "transformers", "xxhash")


def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(), **installed_versions(_LIBRARIES)}


@dataclass(frozen=True)
class ShardHashes:
    """What a writer learnt of one shard while writing it: its content hash, every tensor's hash, and
    the file's identity (content_hash.identity) right after it was closed, which tells whether the
    hashes still describe the file."""

    content: str
    tensors: dict[str, str]
    identity: tuple[int, int, int, int, int]


def tensor_hasher():
    """A fresh hasher of one tensor's bytes (TENSOR_HASH)."""
    import xxhash

    return xxhash.xxh3_128()


def tensor_hashes(path: Path, cancel: CancelToken = NEVER) -> dict[str, str]:
    """XXH3-128 of every tensor's bytes in one safetensors file, tensors hashed on every core.

    Read with pread into one reused page-aligned buffer per thread (io/aligned.py), not through a
    memory map of the file: mapped pages would count against the process's memory, and an
    export promises to stay small at any size."""
    header = read_header(str(path))
    local = threading.local()
    fd = os.open(path, os.O_RDONLY)

    def one(item):
        cancel.check()
        name, t = item
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = aligned_buffer(READ + PAGE)  # a tensor starts anywhere in a page
        h = tensor_hasher()
        for offset in range(t.start, t.end, READ):
            piece = view_for(buf, offset, min(READ, t.end - offset))
            n = os.preadv(fd, [piece], offset)
            if n != len(piece):
                raise SurgeonError(f"{path}: tensor {name}: file shorter than its header says")
            h.update(piece)
        return name, h.hexdigest()

    from concurrent.futures import ThreadPoolExecutor  # not on an export's path: 5 ms of imports

    try:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            return dict(pool.map(one, header.tensors.items()))
    finally:
        os.close(fd)


def build_manifest(directory: str | os.PathLike, sources: dict[str, dict], donors: dict[str, dict],
                   *, known: dict[str, ShardHashes] | None = None, cancel: CancelToken = NEVER) -> dict:
    """The manifest of the checkpoint in `directory` (its shards already written).

    `sources` maps an output tensor to {"donor": NAME, "name": SOURCE_NAME} (absent for tensors the
    tool made itself, e.g. a mix's routers); `donors` maps a donor name to what identifies it
    (path, fingerprint, content hashes). `known` maps a shard's file name to the hashes its writer
    computed; a shard absent from it, or changed since (another identity), is hashed from disk."""
    directory = Path(directory)
    shards = sorted(p for p in directory.glob("*.safetensors"))
    given = known or {}
    trusted = {p: given[p.name] for p in shards if p.name in given and _unchanged(p, given[p.name])}
    from_disk = [p for p in shards if p not in trusted]
    shard_hashes = hash_files(from_disk, cancel=cancel, use_cache=False, remember=False)  # staged files move next
    shard_hashes.update({p: k.content for p, k in trusted.items()})
    tensors = {}
    for shard in shards:
        header = read_header(str(shard))
        hashes = trusted[shard].tensors if shard in trusted else tensor_hashes(shard, cancel)
        for name, t in header.tensors.items():
            entry = {"shard": shard.name, "dtype": t.dtype, "shape": list(t.shape),
                     "offsets": [t.start, t.end], "hash": hashes[name]}
            if name in sources:
                entry["source"] = sources[name]
            tensors[name] = entry
    others = side_files(directory)
    return {
        "manifest_version": MANIFEST_VERSION,
        "tensor_hash": TENSOR_HASH,
        "shard_hash": ALGORITHM,
        "libraries": library_versions(),
        "donors": donors,
        "shards": {p.name: shard_hashes[p] for p in shards},
        # config.json, generation_config.json, the tokenizer's files, the model card: a changed
        # num_experts_per_tok changes the model as surely as a changed weight.
        "files": {p.name: _file_hash(p) for p in others},
        "tensors": dict(sorted(tensors.items())),
    }


def _file_hash(path: Path) -> str:
    """XXH3-128 of a small file (a config, a tokenizer) as one stream: the shards' chunked hash is for
    files of gigabytes."""
    import xxhash

    h = xxhash.xxh3_128()
    buf = aligned_buffer(READ)
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(buf[:n])
    except OSError as e:
        raise SurgeonError(f"{path}: cannot read ({e.strerror})") from None
    return h.hexdigest()


def side_files(directory: Path) -> list[Path]:
    """The export's files other than its shards and the manifest itself."""
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and p.suffix != ".safetensors" and p.name != MANIFEST_FILE)


def _unchanged(path: Path, known: ShardHashes) -> bool:
    """Whether the file is still the one `known` describes (the same identity)."""
    try:
        return identity(path.stat()) == known.identity
    except OSError:
        return False


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    path = Path(directory) / MANIFEST_FILE
    try:
        with open(path, "w") as f:  # streamed: the whole text of thousands of tensors is the export's peak memory
            f.writelines(manifest_text(manifest))
    except OSError as e:
        raise SurgeonError(f"{path}: cannot write ({e.strerror})") from None
    return path


def manifest_text(manifest: dict):
    """The manifest's JSON text in pieces: indented, each tensor's entry on one line of its own.

    Per entry, because `json.dump` and any indented dump run Python's pure-Python encoder, where a
    compact `json.dumps` runs the C one: 0.07 s against 0.20 s for a DeepSeek-V3's 91,930 tensors
    (about 2 us a tensor saved). One line a tensor also keeps the file easy to grep and diff."""
    head = {k: v for k, v in manifest.items() if k != "tensors"}
    text = json.dumps(head, indent=1)  # small: libraries, donors, shards, side files
    if "tensors" not in manifest:
        yield text + "\n"
        return
    yield (text[:-2] + "," if head else "{") + '\n "tensors": {'  # text ends in "\n}"
    sep = "\n  "
    for name, entry in manifest["tensors"].items():
        yield sep + json.dumps(name) + ": " + json.dumps(entry)
        sep = ",\n  "
    yield "\n }\n}\n"


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SurgeonError(f"{directory}: no {MANIFEST_FILE} (exported by an older moe-surgeon, or not an export)") from None
    except OSError as e:
        raise SurgeonError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise SurgeonError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise SurgeonError(f"{path}: JSON nested too deeply to be a manifest") from None
    if not isinstance(data, dict) or data.get("manifest_version") != MANIFEST_VERSION \
            or not isinstance(data.get("tensors"), dict) or not isinstance(data.get("shards"), dict):
        raise SurgeonError(f"{path}: not a moe-surgeon manifest of version {MANIFEST_VERSION}")
    problem = _malformed(data)
    if problem:
        raise SurgeonError(f"{path}: {problem}")
    return data


def _malformed(m: dict) -> str | None:
    """The first field of a manifest whose type or form is not what build_manifest writes (a hand
    edit, a truncated copy, another tool's file), named by its path; None when all are."""
    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    for key, want in (("tensor_hash", TENSOR_HASH), ("shard_hash", ALGORITHM)):
        if key in m and m[key] != want:
            return f"{key}: {m[key]!r} (this moe-surgeon computes {want})"
    for key in ("shards", "files"):  # manifests before 2026-12 have no files
        table = m.get(key, {})
        if not isinstance(table, dict):
            return f"{key}: expected a mapping of file name to hash"
        for name, digest in table.items():
            if not isinstance(digest, str):
                return f"{key}/{name}: hash {digest!r} is not a string"
    donors = m.get("donors", {})
    if not isinstance(donors, dict):
        return "donors: expected a mapping of donor name to its path and fingerprint"
    for name, ref in donors.items():
        if not isinstance(ref, dict) or not isinstance(ref.get("path"), str) \
                or not isinstance(ref.get("path_from_export", ""), str):
            return f"donors/{name}: expected {{path: ..., path_from_export: ...}}"
    for name, e in m["tensors"].items():
        where = f"tensors/{name}"
        if not isinstance(e, dict):
            return f"{where}: expected {{shard, dtype, shape, offsets, hash}}"
        for key in ("shard", "dtype", "hash"):
            if not isinstance(e.get(key), str):
                return f"{where}/{key}: {e.get(key)!r} is not a string"
        shape, offsets = e.get("shape"), e.get("offsets")
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            return f"{where}/shape: {shape!r} is not a list of sizes"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            return f"{where}/offsets: {offsets!r} is not [start, end]"
        source = e.get("source")
        if source is None:
            continue
        if not isinstance(source, dict) or not isinstance(source.get("donor"), str) \
                or not isinstance(source.get("name"), str):
            return f"{where}/source: expected {{donor: NAME, name: TENSOR}}"
        experts = source.get("experts", [])
        if not isinstance(experts, list) or not all(
                isinstance(r, dict) and isinstance(r.get("donor"), str) and is_int(r.get("from"))
                and is_int(r.get("to")) and 0 <= r["from"] <= r["to"] for r in experts):
            return f"{where}/source/experts: expected a list of {{donor, from, to}} expert ranges"
    return None


def first_difference(directory: str | os.PathLike, manifest: dict, *, cancel: CancelToken = NEVER,
                     use_cache: bool = False) -> str | None:
    """None when the export matches every claim of its manifest; else one line naming the first tensor
    that differs (or the file, when a file is missing or new, or differs outside every tensor).

    Every claim is checked: each side file's hash, each shard's hash, and each tensor's range, dtype,
    shape and hash. A shard's own hash and its tensors' hashes come from one read of its bytes
    (shards read in parallel), so checking the tensors costs no second pass; a manifest edited to
    claim another tensor hash fails even where the shard hash still holds. With `use_cache`, a shard
    whose cached hash matches is taken on trust, tensors and all: not a proof, since that rests on
    file times."""
    directory = Path(directory)
    if isinstance(manifest.get("files"), dict):  # manifests before 2026-12 listed shards only
        problem = _side_file_difference(directory, manifest["files"], cancel)
        if problem:
            return problem
    on_disk = sorted(p.name for p in directory.glob("*.safetensors"))
    for name in sorted(set(manifest["shards"]) - set(on_disk)):
        return f"{directory / name}: shard listed in the manifest is missing"
    for name in sorted(set(on_disk) - set(manifest["shards"])):
        return f"{directory / name}: shard not in the manifest"
    by_shard: dict[str, list[str]] = {}
    for tensor, entry in manifest["tensors"].items():
        by_shard.setdefault(entry["shard"], []).append(tensor)
    for name in sorted(set(by_shard) - set(on_disk)):
        return f"{directory}: tensor {by_shard[name][0]}: its shard {name} is not one of the manifest's shards"
    paths = [directory / n for n in on_disk]
    headers = {}
    for p in paths:  # the layout first: a header read, before any tensor's bytes
        header = headers[p] = read_header(str(p))
        listed = set(by_shard.get(p.name, []))
        for tensor in sorted(set(header.tensors) - listed):
            return f"{p}: tensor {tensor} is not in the manifest"
        for tensor in sorted(listed, key=lambda n: manifest["tensors"][n]["offsets"][0]):
            want = manifest["tensors"][tensor]
            t = header.tensors.get(tensor)
            if t is None:
                return f"{p}: tensor {tensor} is missing"
            if [t.start, t.end] != want["offsets"] or t.dtype != want["dtype"] or list(t.shape) != want["shape"]:
                return (f"{p}: tensor {tensor}: {t.dtype}{list(t.shape)} at {t.start}-{t.end}, the manifest says "
                        f"{want['dtype']}{want['shape']} at {want['offsets'][0]}-{want['offsets'][1]}")
    todo = [p for p in paths if not (use_cache and cached_hash(p) == manifest["shards"][p.name])]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        hashed = dict(zip(todo, pool.map(lambda p: shard_and_tensor_hashes(p, headers[p], cancel), todo)))
    for p in todo:
        content, hashes = hashed[p]
        for tensor in sorted(headers[p].tensors, key=lambda n: headers[p].tensors[n].start):
            want = manifest["tensors"][tensor]["hash"]
            if hashes[tensor] != want:
                return f"{p}: tensor {tensor} differs from the manifest (hash {hashes[tensor]}, expected {want})"
        if content != manifest["shards"][p.name]:
            return f"{p}: shard hash differs from the manifest, outside every tensor (header or padding)"
    return None


def shard_and_tensor_hashes(path: Path, header, cancel: CancelToken = NEVER) -> tuple[str, dict[str, str]]:
    """The shard's content hash (content_hash's, as hash_files gives it) and every tensor's hash
    (TENSOR_HASH), from one sequential read of the file into one reused page-aligned 1 MiB buffer.
    The tensors tile the data after the header (read_header checks that), so each piece read feeds
    the shard's hasher and the hasher of the tensor(s) it falls in."""
    tree = TreeHasher()
    spans = sorted((t.start, t.end, name) for name, t in header.tensors.items())
    hashers = {name: tensor_hasher() for _, _, name in spans}
    buf = aligned_buffer(READ)
    k = 0  # the first span not yet wholly read
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise SurgeonError(f"{path}: cannot read ({e.strerror})") from None
    try:
        for at in range(0, header.size, READ):
            cancel.check()
            want = min(READ, header.size - at)
            n = os.preadv(fd, [buf[:want]], at)
            if n != want:
                raise SurgeonError(f"{path}: changed while it was being hashed (short read at byte {at})")
            piece = buf[:n]
            tree.update(piece)
            i = k
            while i < len(spans) and spans[i][0] < at + n:
                start, end, name = spans[i]
                lo, hi = max(start, at), min(end, at + n)
                if lo < hi:
                    hashers[name].update(piece[lo - at:hi - at])
                if end <= at + n and i == k:
                    k += 1
                i += 1
    except OSError as e:
        raise SurgeonError(f"{path}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
    return tree.hexdigest(), {name: h.hexdigest() for name, h in hashers.items()}


def _side_file_difference(directory: Path, files: dict, cancel: CancelToken) -> str | None:
    present = {p.name: p for p in side_files(directory)}
    for name in sorted(set(files) - set(present)):
        return f"{directory / name}: file listed in the manifest is missing"
    for name in sorted(set(present) - set(files)):
        return f"{directory / name}: file not in the manifest"
    for name, p in sorted(present.items()):
        cancel.check()
        now = _file_hash(p)
        if now != files[name]:
            return f"{p}: differs from the manifest (hash {now}, expected {files[name]})"
    return None
