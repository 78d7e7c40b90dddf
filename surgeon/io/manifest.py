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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from surgeon.errors import SurgeonError
from surgeon.io.content_hash import ALGORITHM, READ, hash_files, identity
from surgeon.io.safetensors_file import read_header
from surgeon.jobs import NEVER, CancelToken

MANIFEST_FILE = "moe-surgeon-manifest.json"
MANIFEST_VERSION = 1
TENSOR_HASH = "xxh3-128"
_LIBRARIES = ("moe-surgeon", "safetensors", "torch", "transformers", "xxhash")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


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

    Read with pread into one reused 1 MiB buffer per thread, not through a memory map: mapped pages
    would count against the process's memory, and an export promises to stay small at any size."""
    header = read_header(str(path))
    local = threading.local()
    fd = os.open(path, os.O_RDONLY)

    def one(item):
        cancel.check()
        name, t = item
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(READ)
        h = tensor_hasher()
        for offset in range(t.start, t.end, READ):
            want = min(READ, t.end - offset)
            n = os.preadv(fd, [memoryview(buf)[:want]], offset)
            if n != want:
                raise SurgeonError(f"{path}: tensor {name}: file shorter than its header says")
            h.update(memoryview(buf)[:n])
        return name, h.hexdigest()

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
    """XXH3-128 of a small file (a config, a tokenizer), read whole: the shards' chunked hash is for
    files of gigabytes."""
    import xxhash

    try:
        return xxhash.xxh3_128_hexdigest(path.read_bytes())
    except OSError as e:
        raise SurgeonError(f"{path}: cannot read ({e.strerror})") from None


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
            json.dump(manifest, f, indent=1)
            f.write("\n")
    except OSError as e:
        raise SurgeonError(f"{path}: cannot write ({e.strerror})") from None
    return path


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
    if not isinstance(data, dict) or data.get("manifest_version") != MANIFEST_VERSION \
            or not isinstance(data.get("tensors"), dict) or not isinstance(data.get("shards"), dict):
        raise SurgeonError(f"{path}: not a moe-surgeon manifest of version {MANIFEST_VERSION}")
    return data


def first_difference(directory: str | os.PathLike, manifest: dict, *, cancel: CancelToken = NEVER,
                     use_cache: bool = False) -> str | None:
    """None when every shard matches the manifest; else one line naming the first tensor that differs
    (or the shard, when a tensor is missing or the shard itself is gone or new). Reads every byte
    unless `use_cache`: a proof should not rest on file times."""
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
    paths = [directory / n for n in on_disk]
    now = hash_files(paths, cancel=cancel, use_cache=use_cache)
    by_shard: dict[str, list[str]] = {}
    for tensor, entry in manifest["tensors"].items():
        by_shard.setdefault(entry["shard"], []).append(tensor)
    for p in paths:
        if now[p] == manifest["shards"][p.name]:
            continue
        header = read_header(str(p))
        hashes = tensor_hashes(p, cancel)
        for tensor in sorted(by_shard.get(p.name, []), key=lambda n: manifest["tensors"][n]["offsets"][0]):
            want = manifest["tensors"][tensor]
            t = header.tensors.get(tensor)
            if t is None:
                return f"{p}: tensor {tensor} is missing"
            if [t.start, t.end] != want["offsets"] or t.dtype != want["dtype"] or list(t.shape) != want["shape"]:
                return (f"{p}: tensor {tensor}: {t.dtype}{list(t.shape)} at {t.start}-{t.end}, the manifest says "
                        f"{want['dtype']}{want['shape']} at {want['offsets'][0]}-{want['offsets'][1]}")
            if hashes[tensor] != want["hash"]:
                return f"{p}: tensor {tensor} differs from the manifest (hash {hashes[tensor]}, expected {want['hash']})"
        return f"{p}: shard hash differs from the manifest, outside every tensor (header or padding)"
    return None


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
