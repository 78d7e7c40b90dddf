"""The session file: the single source of truth the TUI edits and the CLI replays."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from surgeon import __version__
from surgeon.core.donor import DEMO_ROOT, DEMO_SCHEME, Donor, open_donor
from surgeon.core.plan import Assignment, Plan
from surgeon.errors import SurgeonError
from surgeon.io.atomic import write_atomic
from surgeon.io.fs import fs_errors
from surgeon.jobs import NEVER

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).parent.parent / "schema" / f"session-v{SCHEMA_VERSION}.json"


@dataclass
class DonorRef:
    """A donor as a session records it: where it is and the fingerprint that says it is the same one."""

    name: str
    path: str  # as stored: absolute, relative to the session file, or demo:NAME
    fingerprint: str
    model_type: str
    shards: dict[str, str] = field(default_factory=dict)
    label: str = ""
    content_hash: str | None = None  # read and kept if present; no version of the tool wrote one
    content_hashes: dict[str, str] = field(default_factory=dict)  # shard -> full hash (io/content_hash.py)


@dataclass
class ExportRecord:
    """One checkpoint written from the session, as `exports` stores it. A field that is None was not
    recorded (older workbench records lack max_shard_size; only a mix has a kind), and keys this
    version does not know are kept in `extra`, so a record round-trips unchanged."""

    path: str | None = None
    dtype: str | None = None
    max_shard_size: int | None = None
    shards: int | None = None
    tensors: int | None = None
    bytes: int | None = None
    time: str | None = None
    kind: str | None = None  # "mix" for a mix's export; plain exports have none
    extra: dict = field(default_factory=dict)

    # the order every writer has always used; unknown keys go before time, where the mix put its own
    _HEAD = ("path", "kind", "dtype", "max_shard_size", "shards", "tensors", "bytes")

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in self._HEAD if getattr(self, k) is not None}
        out.update(self.extra)
        if self.time is not None:
            out["time"] = self.time
        return out

    @classmethod
    def from_json(cls, data: dict) -> ExportRecord:
        known = {*cls._HEAD, "time"}
        return cls(**{k: data[k] for k in known if k in data},
                   extra={k: v for k, v in data.items() if k not in known})


def now_utc() -> str:
    """A record's time stamp, as every record in a session has it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class SessionRecords:
    """What a session records besides its donors and plan: the probes, their results, the exports and
    the extensions (sweeps, a mix's recipe). The workbench keeps these while its grid holds the plan."""

    probes: list = field(default_factory=list)
    results: list = field(default_factory=list)
    exports: list[ExportRecord] = field(default_factory=list)
    extensions: dict = field(default_factory=dict)
    created: str = ""
    trust_task_code: bool = False

    @classmethod
    def of(cls, session: Session) -> SessionRecords:
        return cls(session.probes, session.results, session.exports, session.extensions, session.created,
                   session.trust_task_code)

    def fill(self, session: Session) -> None:
        """Put these records into `session` (one made from the grid's plan)."""
        session.probes, session.results, session.exports = self.probes, self.results, self.exports
        session.extensions, session.created = self.extensions, self.created
        session.trust_task_code = self.trust_task_code


@dataclass
class Session:
    """What a session file holds: the donors, the plan, and the probes, results and exports recorded."""

    donors: list[DonorRef]
    plan: Plan
    probes: list = field(default_factory=list)
    results: list = field(default_factory=list)
    exports: list[ExportRecord] = field(default_factory=list)
    extensions: dict = field(default_factory=dict)
    created: str = ""
    # Its probes ran code their tasks carry (--trust-task-code): a replay asks the user for it again.
    trust_task_code: bool = False

    def donor(self, name: str) -> DonorRef:
        for d in self.donors:
            if d.name == name:
                return d
        raise SurgeonError(f"session: no donor named {name!r}")

    def to_json(self) -> dict:
        donors = []
        for d in self.donors:
            entry = {"name": d.name, "path": d.path, "fingerprint": d.fingerprint, "model_type": d.model_type}
            if d.label:
                entry["label"] = d.label
            entry["shards"] = d.shards
            if d.content_hash:
                entry["content_hash"] = d.content_hash
            if d.content_hashes:
                entry["content_hashes"] = d.content_hashes
            donors.append(entry)
        plan = []
        for a in self.plan.assignments:
            entry = {"component": a.component, "donor": a.donor, "layers": "all" if a.layers is None else list(a.layers)}
            if a.experts is not None:
                entry["experts"] = list(a.experts)
            plan.append(entry)
        out = {
            "schema_version": SCHEMA_VERSION,
            "tool_version": __version__,
            "created": self.created or now_utc(),
            "donors": donors,
            "base": self.plan.base,
            "plan": plan,
            "probes": self.probes,
            "results": self.results,
            "exports": [r.to_json() for r in self.exports],
            "extensions": self.extensions,
        }
        if self.trust_task_code:  # absent otherwise, so sessions without task code read as before
            out["trust_task_code"] = True
        return out


def donor_path_for_session(donor: Donor, session_dir: Path | None) -> str:
    """Store demo donors as demo:NAME and nearby donors relative to the session, so it travels."""
    path = donor.path.resolve()
    try:
        return DEMO_SCHEME + str(path.relative_to(DEMO_ROOT.resolve()))
    except ValueError:
        pass
    if session_dir is not None:
        try:
            return os.path.relpath(path, session_dir.resolve())
        except ValueError:  # another drive on Windows
            pass
    return str(path)


def make_session(plan: Plan, donors: dict[str, Donor], session_path: str | os.PathLike | None = None) -> Session:
    session_dir = Path(session_path).parent if session_path else None
    refs = [
        DonorRef(
            name=name,
            path=donor_path_for_session(d, session_dir),
            fingerprint=d.fingerprint,
            model_type=d.model_type,
            shards=dict(d.shard_fingerprints),
            label=d.path.name,
            content_hashes=d.cached_full_hashes() or {},  # what is known without reading a byte
        )
        for name, d in donors.items()
    ]
    return Session(refs, plan)


def record_full_hashes(session: Session, donors: dict[str, Donor], *, progress=None, cancel=NEVER) -> None:
    """Give every donor of `session` its full content hashes, reading the shards that the cache
    does not know yet: after this, replay can prove the donors unchanged, not just sample them.
    Old sessions (sparse fingerprints only) are upgraded this way when saved again."""
    for ref in session.donors:
        if ref.content_hashes:
            continue
        # By fingerprint, not by name: a command may name the session's donors its own way (sweep).
        donor = next((d for d in donors.values() if d.fingerprint == ref.fingerprint), None)
        if donor is not None and donor.shards:
            ref.content_hashes = donor.full_hashes(progress=progress, cancel=cancel)


def save_session(session: Session, path: str | os.PathLike) -> None:
    with fs_errors(path, "save the session"):
        write_atomic(path, (json.dumps(session.to_json(), indent=2) + "\n").encode())


@lru_cache(maxsize=1)
def _validator():
    import jsonschema  # only loading a session needs it

    return jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


FINGERPRINT_LENGTH = len("sha256:") + 32  # Donor.fingerprint


def parse_session(data, origin: str) -> Session:
    if not isinstance(data, dict):
        raise SurgeonError(f"{origin}: a session is a JSON object")
    version = data.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise SurgeonError(
            f"{origin}: schema_version {version} is newer than this moe-surgeon understands "
            f"({SCHEMA_VERSION}); upgrade moe-surgeon"
        )
    errors = sorted(_validator().iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        path = [str(p) for p in e.absolute_path]
        message = e.message
        if e.validator == "required" and isinstance(e.instance, dict):
            # "'x' is a required property" at the parent reads as if the parent were wrong: name x
            missing = [k for k in e.validator_value if k not in e.instance][:1]
            path, message = [*path, *map(str, missing)], "missing"
        where = "/".join(path) or "(top level)"
        raise SurgeonError(f"{origin}: invalid session: field {where}: {message}")
    for i, d in enumerate(data["donors"]):
        # The schema checks the form; a fingerprint of another length is never a donor's, and would
        # otherwise surface later as "config.json changed since the session was saved".
        if len(d["fingerprint"]) != FINGERPRINT_LENGTH:
            raise SurgeonError(f"{origin}: invalid session: field donors/{i}/fingerprint: malformed "
                               f"{d['fingerprint'][:80]!r} (expected sha256: and 32 hex digits)")
    names = [d["name"] for d in data["donors"]]
    if len(set(names)) != len(names):
        raise SurgeonError(f"{origin}: invalid session: field donors: donor names repeat")
    for i, a in enumerate(data["plan"]):
        if a["donor"] not in names:
            raise SurgeonError(f"{origin}: invalid session: field plan/{i}/donor: no donor named {a['donor']!r}")
        if a["component"] == "expert" and not a.get("experts"):
            raise SurgeonError(f"{origin}: invalid session: field plan/{i}/experts: component expert needs experts")
    for i, r in enumerate(data.get("exports", [])):
        if not isinstance(r, dict):  # the schema leaves records open; every writer wrote objects
            raise SurgeonError(f"{origin}: invalid session: field exports/{i}: an export record is an object")
    if data["base"] not in names:
        raise SurgeonError(f"{origin}: invalid session: field base: no donor named {data['base']!r}")
    assignments = [
        Assignment(
            a["component"],
            a["donor"],
            None if a.get("layers", "all") == "all" else tuple(a["layers"]),
            tuple(a["experts"]) if a.get("experts") is not None else None,
        )
        for a in data["plan"]
    ]
    donors = [
        DonorRef(d["name"], d["path"], d["fingerprint"], d["model_type"], d.get("shards", {}),
                 d.get("label", ""), d.get("content_hash"), d.get("content_hashes", {}))
        for d in data["donors"]
    ]
    return Session(
        donors,
        Plan(data["base"], assignments),
        probes=data.get("probes", []),
        results=data.get("results", []),
        exports=[ExportRecord.from_json(r) for r in data.get("exports", [])],
        extensions=data.get("extensions", {}),
        created=data.get("created", ""),
        trust_task_code=data.get("trust_task_code", False),
    )


# A session with every item of every probe of a large sweep is tens of megabytes; anything far past
# that is not a session (and `replay /dev/zero` must not read forever).
MAX_SESSION_BYTES = 512 * 2**20


def load_session(path: str | os.PathLike) -> Session:
    from surgeon.io.fs import read_bounded

    path = Path(path)
    raw = read_bounded(path, "session", MAX_SESSION_BYTES, "MOE_SURGEON_MAX_SESSION_BYTES")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
        raise SurgeonError(f"{path}: not valid JSON ({e})") from None
    return parse_session(data, str(path))


def open_session_donors(
    session: Session, session_path: str | os.PathLike, *, ignore_fingerprints: bool = False,
    allow_pickle: bool = False,
) -> dict[str, Donor]:
    """Open every donor of a session and check its sparse fingerprint: a quick identity (which file),
    not a proof of its bytes; `check_donor_contents` is the proof."""
    base_dir = Path(session_path).resolve().parent
    donors = {}
    for ref in session.donors:
        donor = open_donor(ref.path, relative_to=base_dir, allow_pickle=allow_pickle)
        if not ignore_fingerprints and donor.fingerprint != ref.fingerprint:
            if ref.content_hashes:  # the full hashes can say which shard and tensor changed
                _refuse_changed_shards(session, session_path, ref, donor, donor.full_hashes())
            changed = sorted(
                set(n for n in ref.shards if donor.shard_fingerprints.get(n) != ref.shards[n])
                | (set(donor.shard_fingerprints) - set(ref.shards))
            )
            what = f"shard {changed[0]}" if changed else "config.json"
            raise SurgeonError(
                f"donor {ref.name} ({donor.path}): {what} changed since the session was saved "
                "(fingerprint mismatch); pass --ignore-fingerprints to replay anyway"
            )
        donors[ref.name] = donor
    return donors


@dataclass
class DonorCheck:
    """How a replay checked its donors, so what it prints says exactly that and no more."""

    full: list[str] = field(default_factory=list)  # every byte hashed and equal to the session's hashes
    sparse: list[str] = field(default_factory=list)  # the session has no full hashes: fingerprint only
    ignored: bool = False

    @property
    def verified(self) -> bool:
        return not self.ignored and not self.sparse and bool(self.full)

    @property
    def status(self) -> str:
        """One word for --json and for the replayed session: verified, sparse or ignored."""
        return "ignored" if self.ignored else "verified" if self.verified else "sparse"

    def line(self) -> str:
        if self.ignored:
            return "donors not checked: fingerprints ignored (--ignore-fingerprints)"
        if self.verified:
            return "donors verified: every byte matches the session's full content hashes"
        note = (f"donor(s) {', '.join(self.sparse)} checked by sparse fingerprint only (a sample of each shard, "
                "not a proof: the session records no full hashes; saving it again records them)")
        if self.full:
            return f"donor(s) {', '.join(self.full)} verified in full; " + note
        return note


def check_donor_contents(session: Session, donors: dict[str, Donor], session_path: str | os.PathLike | None = None,
                         *, progress=None, cancel=NEVER) -> DonorCheck:
    """Prove each donor is the one the session was made with, byte for byte, where the session
    records full hashes (a cache hit costs a stat). A changed shard is refused naming the donor, the
    shard and, where one of the session's exports has a manifest, the first tensor that differs."""
    check = DonorCheck()
    for ref in session.donors:
        donor = donors[ref.name]
        if not ref.content_hashes:
            check.sparse.append(ref.name)
            continue
        _refuse_changed_shards(session, session_path, ref, donor, donor.full_hashes(progress=progress, cancel=cancel))
        check.full.append(ref.name)
    return check


def _refuse_changed_shards(session: Session, session_path, ref: DonorRef, donor: Donor, now: dict[str, str]) -> None:
    for shard in sorted(set(ref.content_hashes) | set(now)):
        if now.get(shard) == ref.content_hashes.get(shard):
            continue
        if shard not in now or shard not in ref.content_hashes:
            what = "is gone" if shard not in now else "is new"
            raise SurgeonError(f"donor {ref.name} ({donor.path}): shard {shard} {what} since the session was "
                               "saved; pass --ignore-fingerprints to replay anyway")
        tensor = first_changed_tensor(session, session_path, ref.name, donor, shard)
        where = f"; first differing tensor: {tensor}" if tensor else ""
        raise SurgeonError(f"donor {ref.name} ({donor.path}): shard {shard} changed since the session was saved "
                           f"(full content hash differs{where}); pass --ignore-fingerprints to replay anyway")


def first_changed_tensor(session: Session, session_path, donor_name: str, donor: Donor, shard: str) -> str | None:
    """The first tensor (in file order) of `shard` whose bytes differ from what one of the session's
    exports copied from it, by the export's manifest; None when no export manifest can tell."""
    from surgeon.io.manifest import MANIFEST_FILE, read_manifest, tensor_hashes

    base_dir = Path(session_path).resolve().parent if session_path else Path.cwd()
    tensors = donor.shards[shard].tensors
    now = None
    for record in session.exports:
        if not record.path:
            continue
        directory = base_dir / record.path
        if not (directory / MANIFEST_FILE).is_file():
            continue
        try:
            manifest = read_manifest(directory)
        except SurgeonError:
            continue
        copied = {}
        for entry in manifest["tensors"].values():
            src = entry.get("source") or {}
            if src.get("donor") == donor_name and src.get("name") in tensors \
                    and tensors[src["name"]].dtype == entry["dtype"]:
                copied[src["name"]] = entry["hash"]
        if not copied:
            continue
        if now is None:
            now = tensor_hashes(donor.path / shard)
        for name in sorted(copied, key=lambda n: tensors[n].start):
            if now.get(name) != copied[name]:
                return name
    return None


def refuse_mix_session(session: Session, path, instead: str) -> None:
    """A mix session's plan is only the dense part of the mix (its transfers; features/mix/build.py), and a
    prune session's is the model before pruning, so a command that works on a session's plan would
    silently measure or change the wrong model."""
    if "mix" in session.extensions:
        raise SurgeonError(f"{path}: a mix session; {instead} the mix's export directory instead")
    if "prune" in session.extensions:  # features/prune/session.py: its plan is the original, unpruned
        raise SurgeonError(f"{path}: a prune or merge-experts session, whose plan is the original before experts "
                           f"were removed; {instead} its export directory instead")


def open_target(target: str, verb: str, *, allow_pickle: bool = False) -> tuple[Session | None, dict[str, Donor], Plan]:
    """What `probe`, `routing` and `gates add` work on: a session file (its hybrid, its donors) or a
    checkpoint directory (that model alone, as donor A). `verb` finishes the refusal of a mix session."""
    if Path(target).is_file():
        session = load_session(target)
        refuse_mix_session(session, target, verb)
        return session, open_session_donors(session, target, allow_pickle=allow_pickle), session.plan
    return None, {"A": open_donor(target, allow_pickle=allow_pickle)}, Plan("A")
