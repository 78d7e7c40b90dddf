"""A donor: a local checkpoint directory, opened lazily.

Opening reads config.json and the safetensors headers only. Tensor bytes stay on disk until an
export copies them as byte ranges or a materialisation memory-maps them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from surgeon.core import collector
from surgeon.core.anatomy import Anatomy, build_anatomy
from surgeon.core.gates_sidecar import GATES_FILE, check_sidecar
from surgeon.errors import SurgeonError
from surgeon.io.dtypes import DTYPE_SIZES, FROM_TORCH
from surgeon.io.safetensors_file import Header, TensorInfo, read_header
from surgeon.io.sources import register_sources

DEMO_SCHEME = "demo:"
DEMO_ROOT = Path(__file__).parent.parent / "demo" / "data"

# Files other than weights that make a checkpoint usable; an export copies those the base has.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

TORCH_TO_SAFETENSORS = FROM_TORCH


def resolve_path(spec: str, relative_to: str | os.PathLike | None = None) -> Path:
    """A donor path as written by a user or a session: `demo:NAME`, absolute, or relative."""
    if spec.startswith(DEMO_SCHEME):
        name = spec[len(DEMO_SCHEME):]
        path = DEMO_ROOT / name
        if not path.is_dir():
            known = ", ".join(sorted(p.name for p in DEMO_ROOT.iterdir())) if DEMO_ROOT.is_dir() else "none"
            raise SurgeonError(f"{spec}: no such built-in demo donor (known: {known})")
        return path
    path = Path(spec).expanduser()
    if not path.is_absolute() and relative_to is not None:
        path = Path(relative_to) / path
    return path


@dataclass
class Donor:
    """An opened checkpoint: its config and every tensor's header entry, read without loading weights."""

    # Only the path in its repr: a donor holds up to ~90,000 tensor entries, and Textual describes a
    # worker by the repr of its arguments (1.3 s for two DeepSeek-V3 donors).
    path: Path
    config: dict = field(repr=False)
    config_bytes: bytes = field(repr=False)
    shards: dict[str, Header] = field(repr=False)  # shard file name -> header
    tensors: dict[str, TensorInfo] = field(repr=False)
    pickled: dict = field(default_factory=dict, repr=False)  # name -> torch tensor, only with --allow-pickle
    memo: dict = field(default_factory=dict, repr=False, compare=False)  # derived tables, see resolve

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "unknown"))

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False)) and "lm_head.weight" not in self.tensors

    @cached_property
    def anatomy(self) -> Anatomy:
        return build_anatomy(self.model_type, list(self.tensors), self.config,
                             {n: t.shape for n, t in self.tensors.items()})

    @cached_property
    def layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Each tensor's (dtype, shape) by name: two donors with equal layouts fit each other tensor
        for tensor (see resolve._same_layout)."""
        return {n: t[1:3] for n, t in self.tensors.items()}

    @cached_property
    def ordered_names(self) -> list[str]:
        """Tensor names with layers in numeric order: the order exports write them in."""
        from surgeon.core.anatomy import natural_key

        with collector.paused():
            return sorted(self.tensors, key=natural_key)

    @cached_property
    def part_groups(self) -> dict:
        """Classified tensor names grouped by part, so a plan is decided once per part, not per tensor."""
        return _group_by_part(self.ordered_names, self.anatomy.parts)

    @cached_property
    def part_groups_as_stored(self) -> dict:
        """`part_groups` in the order the files list the names: for checks whose order does not
        matter, without sorting 92,000 names first (DeepSeek-V3)."""
        return _group_by_part(self.anatomy.parts, self.anatomy.parts)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @cached_property
    def numel(self) -> dict[str, int]:
        """Elements per tensor, counted once (a donor may hold 90,000 tensors). A checked header's
        byte range is exactly its shape's elements times the dtype's size, so bytes say it."""
        sizes = DTYPE_SIZES
        return {n: (t.end - t.start) // sizes[t.dtype] for n, t in self.tensors.items()}

    @property
    def num_parameters(self) -> int:
        return sum(self.numel.values())

    @cached_property
    def dtype(self) -> str:
        """The dtype holding most parameters (checkpoints often keep a few fp32 tensors)."""
        held: dict[str, int] = {}
        for t in self.tensors.values():
            held[t.dtype] = held.get(t.dtype, 0) + t.end - t.start
        counts = {dtype: nbytes // DTYPE_SIZES[dtype] for dtype, nbytes in held.items()}
        return max(counts, key=counts.get) if counts else "none"

    @cached_property
    def shard_fingerprints(self) -> dict[str, str]:
        out = {}
        for name, h in sorted(self.shards.items()):
            digest = hashlib.sha256(name.encode() + b"\0" + h.raw + b"\0" + str(h.size).encode())
            digest.update(_sample_bytes(self.path / name, h.size))
            out[name] = digest.hexdigest()[:16]
        return out

    @cached_property
    def fingerprint(self) -> str:
        """Hash of config bytes, every shard's header bytes and size, and a sparse sample of its bytes.

        Headers alone cannot tell apart two fine-tunes of one base (same names, shapes, dtypes and
        offsets), so a few kilobytes at evenly spaced offsets join them: cheap, and any
        fine-tune changes them. `content_hash` reads every byte when a proof is needed.
        """
        digest = hashlib.sha256(self.config_bytes)
        for name, fp in self.shard_fingerprints.items():
            digest.update(f"{name}:{fp};".encode())
        return "sha256:" + digest.hexdigest()[:32]

    def full_hashes(self, *, progress=None, cancel=None, background: bool = False) -> dict[str, str]:
        """Every shard's full content hash (io/content_hash.py): read once, then a stat per shard
        while the file is unchanged. What "verified" rests on. `background`: see hash_files."""
        from surgeon.io.content_hash import hash_files
        from surgeon.jobs import NEVER

        paths = {name: self.path / name for name in sorted(self.shards)}
        got = hash_files(paths.values(), progress=progress, cancel=cancel or NEVER, background=background)
        return {name: got[p] for name, p in paths.items()}

    def cached_full_hashes(self) -> dict[str, str] | None:
        """The full hashes if every shard's is in the cache for the file as it is now; else None.
        Costs a stat per shard, never a read: for saving a session without waiting."""
        from surgeon.io.content_hash import cached_hashes

        names = sorted(self.shards)
        hashes = cached_hashes([self.path / name for name in names])
        return None if None in hashes else dict(zip(names, hashes))

    def content_hash(self) -> str:
        """One hash of config.json and every byte of every shard (from the shards' full hashes)."""
        digest = hashlib.sha256(self.config_bytes)
        for name, h in self.full_hashes().items():
            digest.update(f"{name}:{h};".encode())
        return "sha256:" + digest.hexdigest()

    def side_files(self) -> list[Path]:
        return [self.path / n for n in SIDE_FILES if (self.path / n).is_file()]


SAMPLE_BLOCKS, SAMPLE_BYTES = 16, 4096


def _sample_bytes(path: Path, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
                return f.read()
            step = (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1)
            return b"".join(os.pread(f.fileno(), SAMPLE_BYTES, i * step) for i in range(SAMPLE_BLOCKS))
    except OSError as e:
        raise SurgeonError(f"{path}: cannot read ({e.strerror})") from None


def _read_config(path: Path) -> tuple[dict, bytes]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise SurgeonError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        raw = cfg_path.read_bytes()
        config = json.loads(raw)
    except OSError as e:
        raise SurgeonError(f"{cfg_path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise SurgeonError(f"{cfg_path}: invalid JSON ({e})") from None
    except RecursionError:
        raise SurgeonError(f"{cfg_path}: invalid JSON (nested too deeply)") from None
    if not isinstance(config, dict):
        raise SurgeonError(f"{cfg_path}: expected a JSON object")
    _check_config_types(config, cfg_path)
    return config, raw


# config.json fields the engine reads as counts. Checked for type before anything uses them, so
# `"num_hidden_layers": "two"` is a line naming the field, not a ValueError deep in the anatomy.
# null counts as absent: transformers' own defaults then apply.
COUNT_FIELDS = ("num_hidden_layers", "hidden_size", "vocab_size", "num_experts", "num_local_experts",
                "n_routed_experts", "num_experts_per_tok", "num_nextn_predict_layers")


def _check_config_types(config: dict, cfg_path: Path) -> None:
    for key in COUNT_FIELDS:
        value = config.get(key)
        if value is not None and not (type(value) is int and value >= 0):
            raise SurgeonError(f"{cfg_path}: field {key} is {_short(value)}, expected a non-negative integer")
    for key, ok, expected in (
        ("model_type", lambda v: isinstance(v, str), "a string"),
        ("architectures", lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v), "a list of strings"),
        ("tie_word_embeddings", lambda v: isinstance(v, bool), "true or false"),
    ):
        if config.get(key) is not None and not ok(config[key]):
            raise SurgeonError(f"{cfg_path}: field {key} is {_short(config[key])}, expected {expected}")


def check_config(donor: Donor) -> Donor:
    """Refuse a config.json that contradicts the tensors: transformers refuses to load such a
    checkpoint (or fills the difference with random weights), and so would every export of it."""
    cfg_path = donor.path / "config.json"
    config = donor.config
    from surgeon.core.anatomy import layer_of

    anatomy = donor.anatomy
    layers = sorted({p.layer for p in anatomy.distinct_parts if p.layer is not None}
                    | {found[0] for name in anatomy.unclassified
                       if (found := layer_of(name, anatomy.architecture)) is not None})
    declared = config.get("num_hidden_layers")
    if declared is not None:
        # DeepSeek-V3 keeps its multi-token-prediction layers after the decoder layers.
        extra = config.get("num_nextn_predict_layers") or 0
        held = f"layers 0-{layers[-1]}" if layers else "no layer"
        if layers and layers[-1] != len(layers) - 1:
            missing = next(i for i, layer in enumerate(layers) if layer != i)
            raise SurgeonError(f"{cfg_path}: num_hidden_layers is {declared} but the tensors hold no layer {missing} "
                               f"(they hold {len(layers)} layers up to layer {layers[-1]})")
        if not declared <= len(layers) <= declared + extra:
            raise SurgeonError(f"{cfg_path}: num_hidden_layers is {declared} but the tensors hold {held}")
    _check_expert_count(donor, cfg_path)
    _check_embedding(donor, cfg_path)
    return donor


def _check_expert_count(donor: Donor, cfg_path: Path) -> None:
    from surgeon.core.architectures import EXPERT_COUNT_KEYS, architecture_for
    from surgeon.core.plan import format_ranges

    arch, known = architecture_for(donor.model_type)
    if known:
        key, declared = arch.experts_key, arch.expert_count(donor.config)
        key = " + ".join((key, *arch.added_experts_keys)) if arch.added_experts_keys else key
    else:
        key = next((k for k in EXPERT_COUNT_KEYS if donor.config.get(k) is not None), None)
        declared = donor.config.get(key) if key else None
    if declared is None:
        return
    held: dict[int, set[int]] = {}
    anatomy = donor.anatomy
    for part in anatomy.distinct_parts:
        if part.expert is not None:
            held.setdefault(part.layer, set()).add(part.expert)
    if any(part.fused for part in anatomy.distinct_parts):
        for name, part in anatomy.parts.items():
            if part.fused and donor.tensors[name].shape:  # every expert of the layer, expert axis first
                held.setdefault(part.layer, set()).update(range(donor.tensors[name].shape[0]))
    for layer, experts in sorted(held.items()):
        if len(experts) != declared or max(experts) != declared - 1:  # not range(declared): it may be huge
            raise SurgeonError(
                f"{cfg_path}: {key} is {declared} but layer {layer} holds {len(experts)} experts "
                f"({format_ranges(experts)})"
            )


def _check_embedding(donor: Donor, cfg_path: Path) -> None:
    info = donor.tensors.get("model.embed_tokens.weight")
    if info is None:
        return
    if len(info.shape) != 2:
        raise SurgeonError(f"{cfg_path}: model.embed_tokens.weight has shape {list(info.shape)}, "
                           "expected [vocab_size, hidden_size]")
    for key, axis, what in (("vocab_size", 0, "rows"), ("hidden_size", 1, "columns")):
        declared = donor.config.get(key)
        if declared is not None and declared != info.shape[axis]:
            raise SurgeonError(f"{cfg_path}: {key} is {declared} but model.embed_tokens.weight has "
                               f"{info.shape[axis]} {what} (shape {list(info.shape)})")


def _group_by_part(names, parts: dict) -> dict:
    """{part: its names in the order given}. Tensors of one part share one Part object, so they are
    grouped by identity and only the distinct parts are hashed."""
    by_id: dict[int, tuple] = {}
    for name in names:
        part = parts.get(name)
        if part is not None:
            found = by_id.get(id(part))
            if found is None:
                found = by_id[id(part)] = (part, [])
            found[1].append(name)
    groups: dict = {}
    for part, members in by_id.values():  # equal parts made apart (globals) join here
        groups.setdefault(part, []).extend(members)
    return groups


def _short(value, limit: int = 60) -> str:
    try:
        text = json.dumps(value)
    except RecursionError:
        return "a deeply nested value"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _inside(name: str) -> bool:
    """Whether an index's shard name stays inside the donor directory: relative, no `..`, no NUL.
    (A shard that is itself a symlink, as in a Hugging Face cache snapshot, is fine: the name is.)"""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts and "\0" not in name


def _weight_map(path: Path) -> dict | None:
    """The index's weight_map (tensor -> shard file), or None without an index; read once per donor
    (DeepSeek-V3's maps 92,000 tensors)."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
        return weight_map
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SurgeonError(f"{index}: invalid index (expected a JSON object with a weight_map)") from None


def _shard_names(path: Path, weight_map: dict | None) -> list[str] | None:
    """Shard files named by the index, or the single file; None when there are no safetensors."""
    index = path / "model.safetensors.index.json"
    if weight_map is not None:
        try:
            names = sorted(set(weight_map.values()))
        except TypeError:
            raise SurgeonError(f"{index}: invalid index (expected a JSON object with a weight_map)") from None
        for n in names:
            if not isinstance(n, str) or not _inside(n):
                raise SurgeonError(f"{index}: names shard {_short(n)}, which is not a file inside {path}")
            if not (path / n).is_file():
                raise SurgeonError(f"{index}: names shard {n}, which does not exist")
        return names
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"]
    found = sorted(p.name for p in path.glob("*.safetensors") if p.name != GATES_FILE)
    return found or None


class DonorsByPath:
    """Donors opened from paths as they are named, each once (the same directory twice is one donor),
    named by the next free letter: what the command line does with --base, --take and --expert."""

    def __init__(self, *, allow_pickle: bool = False):
        self.allow_pickle = allow_pickle
        self.donors: dict[str, Donor] = {}
        self._names: dict[Path, str] = {}

    def name_for(self, path: str) -> str:
        from surgeon.core.plan import next_donor_name

        known = self._names.get(resolve_path(str(path)).resolve())
        if known is not None:  # `--take experts=B --take attention=B`: B's headers are read once
            return known
        donor = open_donor(path, allow_pickle=self.allow_pickle)
        key = donor.path.resolve()
        if key not in self._names:
            self._names[key] = next_donor_name(self.donors)
            self.donors[self._names[key]] = donor
        return self._names[key]


def open_donor(spec: str | os.PathLike, *, relative_to=None, allow_pickle: bool = False) -> Donor:
    with collector.paused():
        return _open_donor(spec, relative_to, allow_pickle)


def _open_donor(spec, relative_to, allow_pickle: bool) -> Donor:
    path = resolve_path(str(spec), relative_to)
    if not path.exists():
        raise SurgeonError(f"{path}: no such directory")
    if not path.is_dir():
        raise SurgeonError(f"{path}: not a directory (a donor is a checkpoint directory)")
    config, config_bytes = _read_config(path)
    weight_map = _weight_map(path)
    names = _shard_names(path, weight_map)
    if names is None:
        return check_config(_open_pickled(path, config, config_bytes, allow_pickle))
    shards = {n: read_header(str(path / n)) for n in names}
    tensors: dict[str, TensorInfo] = {}
    for n, h in shards.items():
        for tname, info in h.tensors.items():
            if tname in tensors:
                raise SurgeonError(f"{path / n}: tensor {tname} also appears in {Path(tensors[tname].file).name}")
            tensors[tname] = info
    if weight_map is not None:
        for tname, shard in weight_map.items():
            if tname not in shards[shard].tensors:
                raise SurgeonError(f"{path / 'model.safetensors.index.json'}: maps {tname} to {shard}, "
                                   "which does not contain it")
    _add_gates_sidecar(path, config, shards, tensors)
    donor = check_config(Donor(path, config, config_bytes, shards, tensors))
    register_sources([*(path / n for n in shards), *donor.side_files(), path / "model.safetensors.index.json"],
                     f"donor {path}")
    return donor


def _add_gates_sidecar(path: Path, config: dict, shards: dict, tensors: dict) -> None:
    """A Self-MoE gated checkpoint keeps its gates in a sidecar (see gates_sidecar.py). Its tensors
    join the donor's like a shard's: the fingerprint covers them, the anatomy classifies them
    as `layer_gate`, and exports and hybrids take them like any component."""
    sidecar = path / GATES_FILE
    if not sidecar.is_file():
        return
    header = read_header(str(sidecar))
    check_sidecar(header, config, sidecar)
    for tname, info in header.tensors.items():
        if tname in tensors:
            raise SurgeonError(f"{sidecar}: tensor {tname} also appears in {Path(tensors[tname].file).name}")
        tensors[tname] = info
    shards[GATES_FILE] = header


def _open_pickled(path: Path, config: dict, config_bytes: bytes, allow_pickle: bool) -> Donor:
    bins = sorted(p.name for p in path.glob("*.bin"))
    if not bins:
        raise SurgeonError(f"{path}: no weights found (no *.safetensors and no pytorch_model.bin)")
    if not allow_pickle:
        raise SurgeonError(
            f"{path}: pickle-only checkpoint ({bins[0]}); pickles can run code when loaded, "
            "so pass --allow-pickle to load it with torch.load(weights_only=True)"
        )
    import torch  # only a pickle donor needs torch to be opened

    pickled = {}
    tensors = {}
    for n in bins:
        try:
            state = torch.load(path / n, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # a bad pickle is user input, not a bug of ours
            why = re.search(r"Unsupported global: GLOBAL \S+", str(e))
            why = why.group(0) if why else (str(e).strip().splitlines() or [""])[0]
            raise SurgeonError(f"{path / n}: cannot load with weights_only=True ({why})") from None
        if not isinstance(state, dict):
            raise SurgeonError(f"{path / n}: expected a state dict, found {type(state).__name__}")
        for tname, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise SurgeonError(f"{path / n}: entry {tname} is a {type(t).__name__}, not a tensor")
            pickled[tname] = t
            dtype = TORCH_TO_SAFETENSORS.get(str(t.dtype))
            if dtype is None:
                raise SurgeonError(f"{path / n}: tensor {tname} has unsupported dtype {t.dtype}")
            nbytes = t.numel() * t.element_size()
            tensors[tname] = TensorInfo(str(path / n), dtype, tuple(t.shape), 0, nbytes)
    headers = {
        n: Header(str(path / n), n.encode(), (path / n).stat().st_size, {}, {}) for n in bins
    }
    return Donor(path, config, config_bytes, headers, tensors, pickled)
