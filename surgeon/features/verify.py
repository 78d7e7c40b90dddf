"""Re-check an export against its manifest and, optionally, every tensor against its donor's bytes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from surgeon.core.donor import open_donor
from surgeon.errors import SurgeonError
from surgeon.io.manifest import first_difference, read_manifest
from surgeon.jobs import NEVER, CancelToken, Meter, Progress


@dataclass
class VerifyResult:
    directory: Path
    shards: int
    tensors: int
    problem: str | None  # one line naming the first thing that differs; None when all matched
    donor_tensors: int = 0  # tensors compared byte for byte with their donor's
    converted: int = 0  # tensors whose dtype was converted: checked against the manifest only

    @property
    def ok(self) -> bool:
        return self.problem is None


class _Files:
    """The files compared, each opened once; ranges read in chunks, so memory stays one chunk."""

    CHUNK = 1 << 24

    def __init__(self):
        self._fds: dict[Path, int] = {}

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def same(self, a: Path, a_start: int, b: Path, b_start: int, length: int) -> bool:
        fa, fb = self._fd(a), self._fd(b)
        for off in range(0, length, self.CHUNK):
            n = min(self.CHUNK, length - off)
            if os.pread(fa, n, a_start + off) != os.pread(fb, n, b_start + off):
                return False
        return True

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)


def run_verify(directory: str | os.PathLike, *, donors: bool = False, progress: Progress | None = None,
               cancel: CancelToken = NEVER, allow_pickle: bool = False) -> VerifyResult:
    directory = Path(directory)
    manifest = read_manifest(directory)
    result = VerifyResult(directory, len(manifest["shards"]), len(manifest["tensors"]), None)
    result.problem = first_difference(directory, manifest, cancel=cancel)
    if result.problem or not donors:
        return result
    opened = {}
    for name, ref in manifest.get("donors", {}).items():
        # A relative donor path was given from where the export ran; the manifest also says where the
        # donor is from the export itself, which holds wherever verify is run from.
        path = ref["path"]
        if not Path(path).is_absolute() and ref.get("path_from_export"):
            path = str(directory / ref["path_from_export"])
        try:
            opened[name] = open_donor(path, allow_pickle=allow_pickle)
        except SurgeonError as e:
            raise SurgeonError(f"verify --donors: donor {name}: {e}") from None
    meter = Meter(progress, len(manifest["tensors"]), "tensors", "comparing with donors")
    files = _Files()
    try:
        for i, (tensor, entry) in enumerate(manifest["tensors"].items()):
            cancel.check()
            meter(i)
            source = entry.get("source")
            if not source:
                continue
            donor = opened.get(source["donor"])
            src = donor.tensors.get(source["name"]) if donor else None
            if src is None:
                result.problem = (f"{directory}: tensor {tensor}: its source {source['donor']}:{source['name']} "
                                  "is not in the donor")
                return result
            if src.dtype != entry["dtype"]:
                result.converted += 1
                continue
            start, end = entry["offsets"]
            # Ranges of experts (rows of the first axis) written one after another, each from the donor it
            # names: a spliced fused tensor's ranges cover every row, a pruned one's only the kept rows.
            row = src.nbytes // src.shape[0] if src.shape and src.shape[0] else 0
            pieces, at = [], 0  # (donor, offset in the output, offset in the donor's tensor, bytes)
            for r in source.get("experts", ()):
                pieces.append((r["donor"], at, r["from"] * row, (r["to"] - r["from"]) * row))
                at += (r["to"] - r["from"]) * row
            if any(offset + count > src.nbytes for _, _, offset, count in pieces):  # read past it, it would never end
                result.problem = (f"{directory}: tensor {tensor}: its source's expert ranges "
                                  f"{[(r['from'], r['to']) for r in source['experts']]} go past the tensor's "
                                  f"{src.shape[0] if src.shape else 0} experts")
                return result
            if end - start != (at if pieces else src.nbytes):
                result.problem = (f"{directory / entry['shard']}: tensor {tensor} differs from donor "
                                  f"{source['donor']}'s {source['name']} ({src.file})")
                return result
            for donor_name, offset, src_offset, count in pieces or [(source["donor"], 0, 0, src.nbytes)]:
                d = opened.get(donor_name)
                piece = d.tensors.get(source["name"]) if d else None
                if piece is None or not files.same(directory / entry["shard"], start + offset, Path(piece.file),
                                                   piece.start + src_offset, count):
                    result.problem = (f"{directory / entry['shard']}: tensor {tensor} differs from donor "
                                      f"{donor_name}'s {source['name']}"
                                      + (f" ({piece.file})" if piece is not None else " (not in the donor)"))
                    return result
            result.donor_tensors += 1
    finally:
        files.close()
    meter(len(manifest["tensors"]))
    return result
