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

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).parent.parent / "schema" / f"session-v{SCHEMA_VERSION}.json"


@dataclass
class DonorRef:
    name: str
    path: str  # as stored: absolute, relative to the session file, or demo:NAME
    fingerprint: str
    model_type: str
    shards: dict[str, str] = field(default_factory=dict)
    label: str = ""
    content_hash: str | None = None


@dataclass
class Session:
    donors: list[DonorRef]
    plan: Plan
    probes: list = field(default_factory=list)
    results: list = field(default_factory=list)
    exports: list = field(default_factory=list)
    extensions: dict = field(default_factory=dict)
    created: str = ""

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
            donors.append(entry)
        plan = []
        for a in self.plan.assignments:
            entry = {"component": a.component, "donor": a.donor, "layers": "all" if a.layers is None else list(a.layers)}
            if a.experts is not None:
                entry["experts"] = list(a.experts)
            plan.append(entry)
        return {
            "schema_version": SCHEMA_VERSION,
            "tool_version": __version__,
            "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "donors": donors,
            "base": self.plan.base,
            "plan": plan,
            "probes": self.probes,
            "results": self.results,
            "exports": self.exports,
            "extensions": self.extensions,
        }


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
        )
        for name, d in donors.items()
    ]
    return Session(refs, plan)


def save_session(session: Session, path: str | os.PathLike) -> None:
    write_atomic(path, (json.dumps(session.to_json(), indent=2) + "\n").encode())


@lru_cache(maxsize=1)
def _validator():
    import jsonschema  # only loading a session needs it

    return jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


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
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise SurgeonError(f"{origin}: invalid session: field {where}: {e.message}")
    names = [d["name"] for d in data["donors"]]
    if len(set(names)) != len(names):
        raise SurgeonError(f"{origin}: invalid session: field donors: donor names repeat")
    for i, a in enumerate(data["plan"]):
        if a["donor"] not in names:
            raise SurgeonError(f"{origin}: invalid session: field plan/{i}/donor: no donor named {a['donor']!r}")
        if a["component"] == "expert" and not a.get("experts"):
            raise SurgeonError(f"{origin}: invalid session: field plan/{i}/experts: component expert needs experts")
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
                 d.get("label", ""), d.get("content_hash"))
        for d in data["donors"]
    ]
    return Session(
        donors,
        Plan(data["base"], assignments),
        probes=data.get("probes", []),
        results=data.get("results", []),
        exports=data.get("exports", []),
        extensions=data.get("extensions", {}),
        created=data.get("created", ""),
    )


def load_session(path: str | os.PathLike) -> Session:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SurgeonError(f"{path}: no such session file") from None
    except OSError as e:
        raise SurgeonError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise SurgeonError(f"{path}: not valid JSON ({e})") from None
    return parse_session(data, str(path))


def open_session_donors(
    session: Session, session_path: str | os.PathLike, *, ignore_fingerprints: bool = False,
    verify: bool = False, allow_pickle: bool = False,
) -> dict[str, Donor]:
    """Open every donor of a session and prove it is the one the session was made with."""
    base_dir = Path(session_path).resolve().parent
    donors = {}
    for ref in session.donors:
        donor = open_donor(ref.path, relative_to=base_dir, allow_pickle=allow_pickle)
        if not ignore_fingerprints and donor.fingerprint != ref.fingerprint:
            changed = sorted(
                set(n for n in ref.shards if donor.shard_fingerprints.get(n) != ref.shards[n])
                | (set(donor.shard_fingerprints) - set(ref.shards))
            )
            what = f"shard {changed[0]}" if changed else "config.json"
            raise SurgeonError(
                f"donor {ref.name} ({donor.path}): {what} changed since the session was saved "
                "(fingerprint mismatch); pass --ignore-fingerprints to replay anyway"
            )
        if verify and ref.content_hash and not ignore_fingerprints:
            if donor.content_hash() != ref.content_hash:
                raise SurgeonError(f"donor {ref.name} ({donor.path}): content hash differs from the session's")
        donors[ref.name] = donor
    return donors


def refuse_mix_session(session: Session, path, instead: str) -> None:
    """A mix session's plan is only the dense part of the mix (its transfers; mix_build.py), so a
    command that works on a session's plan would silently measure or change the wrong model."""
    if "mix" in session.extensions:
        raise SurgeonError(f"{path}: a mix session; {instead} the mix's export directory instead")
