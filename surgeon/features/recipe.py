"""mergekit recipes both ways: a session's plan as a mergekit 0.1.x config, and such a config as a plan.

A component transfer is, in mergekit's terms, a `linear` merge in which every tensor has weight 1 in
exactly one model and 0 in the others. The weights are given per model as a list of conditions
`[{filter: F, value: V}, ..., {value: DEFAULT}]`; mergekit takes the first condition whose filter is
a substring of the tensor's name (mergekit/config.py, evaluate_setting). So a plan (later wins) becomes,
per donor, its assignments in reverse order, each as filters with value 1 where the donor gives it and
0 where another does, then 1 for the base and 0 for the others.

Both directions go through one evaluator of those rules (`_donor_of_tensors`): import reads a config
with it, and export checks what it wrote with it, so a recipe is only called expressible when
mergekit's own semantics give every tensor the donor the plan gives it.

mergekit matches filters against the tensor names of its own architecture definitions, and those are
transformers' in-memory names, not the names on disk: a Mixtral layer's experts are one
`mlp.experts.gate_up_proj` and one `mlp.experts.down_proj`, its router `mlp.gate.weight`. So filters
are written and evaluated on those names (`merge_names`, from the same architecture data hot-swap
uses); a filter on disk names (`block_sparse_moe.experts.`) would match nothing there, and mergekit
would silently keep the base's experts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from surgeon.core.architectures import (
    ARCHITECTURES,
    COMMON_LAYER_RULES,
    GLOBAL_KINDS,
    GLOBAL_RULES,
    LAYER_KINDS,
    LAYER_PREFIX,
)
from surgeon.core.donor import Donor, open_donor
from surgeon.core.plan import Assignment, Plan, next_donor_name
from surgeon.core.session import Session, make_session, open_session_donors
from surgeon.errors import SurgeonError
from surgeon.io.yaml_file import excerpt

# model_types mergekit 0.1.x defines (mergekit/_data/architectures) among those moe-surgeon knows.
MERGEKIT_ARCHITECTURES = frozenset(t for t, a in ARCHITECTURES.items() if a.mergekit)
# safetensors dtype -> mergekit's `dtype`: computing in the donors' own dtype keeps 1*x/1 exact.
MERGEKIT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
METHODS = ("linear", "task_arithmetic", "passthrough")
OUT_OF_SCOPE = "moe-surgeon imports component transfers only (real weight averaging is out of scope)"


@dataclass
class RecipeExport:
    config: dict
    text: str  # the YAML, with a comment per part mergekit cannot express
    inexpressible: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- mergekit's rules, evaluated
def _setting(setting, name: str, what: str):
    """evaluate_setting for one tensor name: the first condition whose filter is in the name."""
    if setting is None:
        return None
    if isinstance(setting, bool) or not isinstance(setting, (int, float, list)):
        raise SurgeonError(f"{what}: {setting!r} is not a number or a list of conditions")
    if isinstance(setting, (int, float)):
        return setting
    if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        if len(set(setting)) > 1:  # a gradient over the layers blends them
            raise SurgeonError(f"{what}: gradient {setting} blends weights across layers; {OUT_OF_SCOPE}")
        return setting[0] if setting else None
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond:
            raise SurgeonError(f"{what}: {cond!r} is not a condition ({{filter: ..., value: ...}})")
        f = cond.get("filter")
        if f is None or f == "*" or str(f) in name:
            return _setting(cond["value"], name, what)
    return None


def _weight(name: str, scopes: list[tuple[dict | None, str]]):
    for params, what in scopes:  # model's own, then the slice's, then the config's (ConfigReader.parameter)
        if params is not None and not isinstance(params, dict):
            raise SurgeonError(f"{what}: parameters {excerpt(repr(params), 80)} is not a mapping")
        if params and "weight" in params:
            value = _setting(params["weight"], name, what)
            if value is not None:
                return value
    return None


def _pick(name: str, method: str, entries, base_key, global_params) -> object:
    """The one model a tensor comes from under `method`; entries are (key, params, slice params)."""
    ones, seen = [], []
    for key, params, slice_params in entries:
        if method == "task_arithmetic" and key == base_key:
            continue  # task arithmetic adds the others' differences to the base; its weight is unused
        w = _weight(name, [(params, f"weight of {key}"), (slice_params, "slice weight"), (global_params, "weight")])
        if w is None:
            raise SurgeonError(f"tensor {name}: no weight for model {key} (mergekit needs one)")
        if w not in (0, 1):
            raise SurgeonError(f"tensor {name}: weight {w} for model {key}; {OUT_OF_SCOPE}")
        seen.append(key)
        if w == 1:
            ones.append(key)
    if len(ones) > 1:
        raise SurgeonError(f"tensor {name}: weight 1 in {len(ones)} models ({', '.join(map(str, ones))}) "
                           f"is a merge of them; {OUT_OF_SCOPE}")
    if not ones:
        if method == "task_arithmetic":
            return base_key
        raise SurgeonError(f"tensor {name}: weight 0 in every model (a linear merge of nothing)")
    return ones[0]


# ---------------------------------------------------------------- filters for a plan
def merge_names(base: Donor) -> dict[str, str]:
    """Each of the base's disk tensors -> the name mergekit gives it: transformers' live name, the
    fused tensor for an expert's projection. Architectures mergekit does not define keep disk names."""
    arch = base.anatomy.architecture
    if base.model_type not in MERGEKIT_ARCHITECTURES:
        return {n: n for n in base.tensors}
    return {n: _merge_name(n, arch) for n in base.tensors}


def _merge_name(disk: str, arch) -> str:
    segs = disk.split(".")
    if segs[:2] != list(LAYER_PREFIX) or len(segs) < 4:
        return disk
    rest = ".".join(segs[3:])
    for old, new in arch.live_renames:
        if rest == old or rest.startswith(old + "."):
            rest = new + rest[len(old):]
    segs = segs[:3] + rest.split(".")
    for i in range(3, len(segs) - 3):
        if (segs[i] == "experts" and segs[i + 1].isdigit() and arch.fused_experts
                and segs[i + 2] in arch.fused_experts and segs[i + 3:] == ["weight"]):
            return ".".join(segs[: i + 1] + [arch.fused_experts[segs[i + 2]][0]])
    return ".".join(segs)


def _module_of(name: str, arch) -> str | None:
    """The module prefix the architecture's rule names for a tensor, e.g. model.layers.1.self_attn;
    for an expert, the layer's experts (mergekit's fused tensor). Rules are tried in the anatomy's
    order, first match wins, as in anatomy.classify."""
    segs = name.split(".")
    for pattern, _ in GLOBAL_RULES:
        if segs[: len(pattern.split("."))] == pattern.split("."):
            return pattern
    n = len(LAYER_PREFIX)
    rest = segs[n + 1:]
    for pattern, _ in COMMON_LAYER_RULES + arch.layer_rules:
        pat = pattern.split(".")
        if len(rest) >= len(pat) and all(s == w or (w == "{E}" and s.isdigit()) for s, w in zip(rest, pat)):
            kept = pat[:-1] if pat[-1] == "{E}" else pat
            return ".".join(segs[: n + 1 + len(kept)])
    return None


def _filters_for(a: Assignment, base: Donor, names: dict[str, str]) -> list[str] | None:
    """Substring filters that match exactly the tensors `a` covers, as mergekit names them (`names`,
    see merge_names); [] if it covers none, None if no filters can (a fused tensor it covers in part)."""
    disk = [n for n, p in base.anatomy.parts.items() if a.covers(p)]
    if not disk:
        return []
    want = {names[n] for n in disk}
    covered = set(disk)
    if any(names[n] in want and n not in covered for n in base.tensors):
        return None
    every = set(names.values())

    def exact(filters) -> bool:
        return {n for n in every if any(f in n for f in filters)} == want

    arch = base.anatomy.architecture
    modules = list(dict.fromkeys(_module_of(n, arch) for n in disk))
    if None not in modules:
        if base.model_type in MERGEKIT_ARCHITECTURES:
            modules = list(dict.fromkeys(_merge_name(m, arch) for m in modules))
        if a.layers is None and all(m.startswith("model.layers.") for m in modules):
            layerless = list(dict.fromkeys("." + m.split(".", 3)[3] + "." for m in modules))
            if exact(layerless):
                return layerless
        per_module = [m + "." for m in modules]
        if exact(per_module):
            return per_module
    listed = sorted(want)
    return listed if exact(listed) else None


def _inexpressible_reason(a: Assignment, base: Donor) -> str | None:
    if a.component == "expert":
        return (f"{a.spec}: mergekit fuses a layer's experts into one tensor on load, so single experts "
                "and expert ranges cannot be picked")
    if a.component == "layer_gate":
        return f"{a.spec}: layer gates are moe-surgeon's sidecar file; mergekit does not know them"
    return None


def export_recipe(session: Session, donors: dict[str, Donor]) -> RecipeExport:
    """The plan as a mergekit linear merge with per-tensor 0/1 weights; what it cannot say, as comments."""
    plan = session.plan
    base = donors[plan.base]
    notes: list[str] = []
    by_type: dict[str, list[str]] = {}
    for name in dict.fromkeys([plan.base, *(a.donor for a in plan.assignments)]):
        by_type.setdefault(donors[name].model_type, []).append(name)
    for mt, names in by_type.items():
        if mt not in MERGEKIT_ARCHITECTURES:
            notes.append(f"architecture {mt} (donor {', '.join(names)}): mergekit has no definition for it; "
                         "the filters below name its tensors as they are on disk")
    kept: list[tuple[Assignment, list[str]]] = []
    names = merge_names(base)
    for a in plan.assignments:
        reason = _inexpressible_reason(a, base)
        filters = None if reason else _filters_for(a, base, names)
        if filters is None:
            notes.append((reason or f"{a.spec}: no name filter matches exactly its tensors")
                         + "; left out of this recipe")
        elif filters:
            kept.append((a, filters))
    used = list(dict.fromkeys([plan.base, *(a.donor for a, _ in kept)]))
    models = []
    for name in used:
        conds: list[dict] = []
        for a, filters in reversed(kept):
            conds += [{"filter": f, "value": int(a.donor == name)} for f in filters]
        default = int(name == plan.base)
        seen, pruned = set(), []
        for c in conds:  # a filter seen before never matches again
            if c["filter"] not in seen:
                seen.add(c["filter"])
                pruned.append(c)
        while pruned and pruned[-1]["value"] == default:  # falling through gives the same value
            pruned.pop()
        models.append({"model": str(donors[name].path.resolve()),
                       "parameters": {"weight": [*pruned, {"value": default}]}})
    config = {"merge_method": "linear", "base_model": str(base.path.resolve()), "models": models,
              "parameters": {"normalize": False}}
    if base.dtype in MERGEKIT_DTYPES:
        config["dtype"] = MERGEKIT_DTYPES[base.dtype]
    # The check: mergekit's rules applied to what was written give each tensor the plan's donor.
    expressible = Plan(plan.base, [a for a, _ in kept])
    path_to_name = {str(donors[n].path.resolve()): n for n in used}
    got = _donor_of_tensors(config, base, path_to_name)
    for tensor, part in base.anatomy.parts.items():
        if got[tensor] != expressible.donor_for(part):  # a bug here, not a user's mistake: say so loudly
            notes.append(f"{tensor}: the recipe gives donor {got[tensor]}, the plan {expressible.donor_for(part)}")
            break
    return RecipeExport(config, _yaml(config, session, notes), notes)


def _yaml(config: dict, session: Session, notes: list[str]) -> str:
    import yaml

    head = ["# mergekit 0.1.x config written by moe-surgeon `recipe export` from a session's plan:",
            "# a linear merge in which every tensor has weight 1 in exactly one model (a component transfer).",
            f"# plan: base {session.plan.base}"
            + "".join(f"; {a.spec} from {a.donor}" for a in session.plan.assignments)]
    names = {d.name: d.path for d in session.donors}
    head += [f"# donor {n}: {p}" for n, p in names.items()]
    head += [f"# NOT EXPRESSIBLE in mergekit: {n}" for n in notes]
    return "\n".join(head) + "\n" + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------- import
def _model_key(ref, what: str) -> str:
    if isinstance(ref, dict):  # {model: {path: ...}} is ModelReference's long form
        inner = ref.get("model", ref)
        ref = inner.get("path") if isinstance(inner, dict) else inner
        if ref is None:
            raise SurgeonError(f"{what}: a model reference needs a path")
    if not isinstance(ref, str) or not ref:
        raise SurgeonError(f"{what}: {ref!r} is not a model path")
    if "+" in ref:
        raise SurgeonError(f"{what}: {ref}: a LoRA applied to a model is not a component transfer")
    return ref


def _donor_of_tensors(config: dict, base: Donor, key_name) -> dict[str, str]:
    """Every base tensor's donor name under `config` (models form), by mergekit's rules."""
    method = config.get("merge_method")
    base_key = _model_key(config["base_model"], "base_model") if config.get("base_model") else None
    entries = []
    for i, m in enumerate(config["models"]):
        if not isinstance(m, dict):
            raise SurgeonError(f"models/{i}: expected {{model: ..., parameters: ...}}")
        entries.append((_model_key(m.get("model"), f"models/{i}"), m.get("parameters"), None))
    if method == "passthrough":
        if len(entries) != 1:
            raise SurgeonError(f"passthrough over {len(entries)} models is a merge of them; {OUT_OF_SCOPE}")
        return {n: key_name[entries[0][0]] for n in base.tensors}
    params = config.get("parameters")
    names = merge_names(base)
    return {n: key_name[_pick(names[n], method, entries, base_key, params)] for n in base.tensors}


def _slices_donor_of_tensors(config: dict, base: Donor, open_key, key_name) -> dict[str, str]:
    """Per tensor donor for a `slices` config: each output slice keeps its layers where they were."""
    method = config.get("merge_method")
    params = config.get("parameters")
    layer_n = len(LAYER_PREFIX)
    by_layer: dict[int, tuple] = {}
    out_layer = 0
    first = None
    for i, s in enumerate(config["slices"]):
        sources = s.get("sources") if isinstance(s, dict) else None
        if not sources or not isinstance(sources, list):
            raise SurgeonError(f"slices/{i}: expected sources")
        entries, ranges = [], set()
        for j, src in enumerate(sources):
            if not isinstance(src, dict):
                raise SurgeonError(f"slices/{i}/sources/{j}: expected {{model: ..., layer_range: [start, end]}}")
            key = _model_key(src.get("model"), f"slices/{i}/sources/{j}")
            lr = src.get("layer_range")
            if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) for x in lr)):
                raise SurgeonError(f"slices/{i}/sources/{j}: layer_range must be [start, end]")
            ranges.add(tuple(lr))
            entries.append((key, src.get("parameters"), s.get("parameters")))
            first = first or key
        if len(ranges) > 1:
            raise SurgeonError(f"slices/{i}: sources over different layer ranges are merged across layers; "
                               + OUT_OF_SCOPE)
        start, end = ranges.pop()
        if start != out_layer:
            raise SurgeonError(f"slices/{i}: layers {start}-{end - 1} of the source land at layer {out_layer}: "
                               "moving or repeating layers is not a component transfer")
        if method == "passthrough" and len(entries) > 1:
            raise SurgeonError(f"slices/{i}: passthrough of {len(entries)} sources; {OUT_OF_SCOPE}")
        if not start < end <= base.anatomy.num_layers:  # before a loop over the range: it may hold 2**64 layers
            raise SurgeonError(f"slices/{i}: layer_range [{start}, {end}] is not a range of the base's "
                               f"{base.anatomy.num_layers} layers")
        for layer in range(start, end):
            by_layer[layer] = (i, entries)
        out_layer = end
    if out_layer != base.anatomy.num_layers:
        raise SurgeonError(f"the slices make {out_layer} layers, the base has {base.anatomy.num_layers}: "
                           "not a component transfer")
    glob = _model_key(config["base_model"], "base_model") if config.get("base_model") else first
    base_key = glob
    names = merge_names(base)
    out = {}
    for n in base.tensors:
        segs = n.split(".")
        if tuple(segs[:layer_n]) == LAYER_PREFIX and len(segs) > layer_n and segs[layer_n].isdigit():
            _, entries = by_layer[int(segs[layer_n])]
            key = entries[0][0] if len(entries) == 1 else _pick(names[n], method, entries, base_key, params)
            out[n] = key_name[key]
        else:
            out[n] = key_name[glob]
    return out


def canonical_plan(base_name: str, base: Donor, donor_of: dict[str, str]) -> Plan:
    """The shortest plan, in component order, giving each of the base's parts its donor."""
    anatomy = base.anatomy
    part_donor: dict = {}
    for tensor, donor in donor_of.items():
        part = anatomy.parts.get(tensor)
        if part is None:
            if donor != base_name:
                raise SurgeonError(f"tensor {tensor} from donor {donor}: moe-surgeon does not know which "
                                   "component it belongs to, so it can only come from the base")
            continue
        if part_donor.setdefault(part, donor) != donor:
            raise SurgeonError(f"the recipe splits {part.label()} between donors {part_donor[part]} and {donor} "
                               f"(tensor {tensor}): not a component transfer")
    assignments: list[Assignment] = []
    for kind in LAYER_KINDS:
        per_layer: dict[int, str | None] = {}
        mixed: dict[int, dict] = {}
        for part, donor in part_donor.items():
            if part.kind != kind:
                continue
            if per_layer.setdefault(part.layer, donor) != donor:
                per_layer[part.layer] = None  # experts of one layer from several donors
            if part.expert is not None:
                mixed.setdefault(part.layer, {}).setdefault(donor, []).append(part.expert)
        comp = "experts" if kind == "expert" else kind
        whole = {layer: d for layer, d in per_layer.items() if d is not None}
        donors_used = set(whole.values())
        if len(donors_used) == 1 and len(whole) == len(per_layer) == anatomy.num_layers:
            d = donors_used.pop()
            if d != base_name:
                assignments.append(Assignment(comp, d))
        else:
            for d in dict.fromkeys(whole.values()):
                if d != base_name:
                    assignments.append(Assignment(comp, d, tuple(sorted(l for l, x in whole.items() if x == d))))
        for layer in sorted(l for l, d in per_layer.items() if d is None):
            for d, experts in mixed[layer].items():
                if d != base_name:
                    assignments.append(Assignment("expert", d, (layer,), tuple(sorted(experts))))
    for kind in GLOBAL_KINDS:
        d = next((d for p, d in part_donor.items() if p.kind == kind), base_name)
        if d != base_name:
            assignments.append(Assignment(kind, d))
    return Plan(base_name, assignments)


MAX_RECIPE_BYTES = 16 * 2**20  # a mergekit config is a page of YAML
def import_recipe(path: str | os.PathLike, session_path: str | os.PathLike | None = None) -> Session:
    """A mergekit config that is a component transfer, as a session (its donors opened and fingerprinted)."""
    from surgeon.io.yaml_file import load_yaml_file

    path = Path(path)
    config = load_yaml_file(path, "recipe", MAX_RECIPE_BYTES, "MOE_SURGEON_MAX_RECIPE_BYTES")
    if not isinstance(config, dict):
        raise SurgeonError(f"{path}: a mergekit config is a mapping (merge_method, models or slices, ...)")
    method = config.get("merge_method")
    if method not in METHODS:
        raise SurgeonError(f"{path}: merge_method {method!r} merges weights; {OUT_OF_SCOPE} "
                           f"(supported: {', '.join(METHODS)} with 0/1 weights)")
    forms = [k for k in ("models", "slices", "modules") if config.get(k)]
    if forms != ["models"] and forms != ["slices"]:
        raise SurgeonError(f"{path}: expected exactly one of models or slices (found: {', '.join(forms) or 'none'})")
    if not isinstance(config[forms[0]], list):
        raise SurgeonError(f"{path}: {forms[0]}: expected a list, not {type(config[forms[0]]).__name__}")
    if method == "task_arithmetic" and not config.get("base_model"):
        raise SurgeonError(f"{path}: task_arithmetic needs a base_model")
    out_dtype = _output_dtype(config, path)

    donors: dict[str, Donor] = {}
    by_key: dict[str, str] = {}
    by_path: dict[Path, str] = {}

    def open_key(key: str) -> str:
        if key not in by_key:
            rel = Path(key).expanduser()
            spec = key if key.startswith("demo:") or rel.is_absolute() or rel.exists() else str(path.parent / rel)
            donor = open_donor(spec)
            real = donor.path.resolve()
            if real not in by_path:
                by_path[real] = next_donor_name(donors)
                donors[by_path[real]] = donor
            by_key[key] = by_path[real]
        return by_key[key]

    keys = []
    try:
        if config.get("base_model"):
            keys.append(_model_key(config["base_model"], "base_model"))
        for i, m in enumerate(config.get("models") or []):
            keys.append(_model_key(m.get("model") if isinstance(m, dict) else m, f"models/{i}"))
        for i, s in enumerate(config.get("slices") or []):
            sources = s.get("sources") if isinstance(s, dict) else None
            if sources and not isinstance(sources, list):
                raise SurgeonError(f"slices/{i}/sources: expected a list, not {type(sources).__name__}")
            for j, src in enumerate(sources or []):
                keys.append(_model_key(src.get("model") if isinstance(src, dict) else src, f"slices/{i}/sources/{j}"))
    except SurgeonError as e:
        raise SurgeonError(f"{path}: {e}") from None
    if not keys:
        raise SurgeonError(f"{path}: names no model (no base_model, and no model in its {forms[0]})")
    for k in keys:
        open_key(k)
    base_name = by_key[keys[0]]
    base = donors[base_name]
    for name, d in donors.items():
        if d.model_type != base.model_type:
            raise SurgeonError(f"{path}: donor {d.path} is {d.model_type}, the base {base.path} is {base.model_type}")
    try:
        if config.get("models"):
            donor_of = _donor_of_tensors(config, base, by_key)
        else:
            donor_of = _slices_donor_of_tensors(config, base, open_key, by_key)
        plan = canonical_plan(base_name, base, donor_of)
    except SurgeonError as e:
        raise SurgeonError(f"{path}: {e}") from None
    _check_tokenizer(config, path, base_name, by_key)
    session = make_session(plan, donors, session_path)
    if out_dtype is not None and MERGEKIT_DTYPES.get(base.dtype) != out_dtype:
        # What mergekit would write: the session's exports default to it (replay --export).
        session.extensions["recipe"] = {"dtype": out_dtype, "from": str(path)}
    return session


# mergekit's dtype names (its dtype_from_name) -> ours
RECIPE_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
                 "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _output_dtype(config: dict, path: Path) -> str | None:
    """The dtype mergekit would write (`out_dtype`, else `dtype`), as ours; None when it names none.
    For 0/1 weights the compute dtype changes no value the output dtype keeps, so only the output's
    counts; a dtype we cannot write is refused, naming the field."""
    found = {}
    for key in ("dtype", "out_dtype"):
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or value.lower() not in RECIPE_DTYPES:
            raise SurgeonError(f"{path}: {key} {excerpt(repr(value), 40)} is not a dtype moe-surgeon writes "
                               f"(one of {', '.join(sorted(set(RECIPE_DTYPES.values())))})")
        found[key] = RECIPE_DTYPES[value.lower()]
    return found.get("out_dtype") or found.get("dtype")


def _check_tokenizer(config: dict, path: Path, base_name: str, by_key: dict[str, str]) -> None:
    """An export keeps the base's tokenizer files: a recipe asking for another tokenizer or chat
    template is refused rather than written without it."""
    tokenizer = config.get("tokenizer")
    source = config.get("tokenizer_source")
    if isinstance(tokenizer, dict):
        if set(tokenizer) - {"source"}:
            raise SurgeonError(f"{path}: tokenizer: {', '.join(sorted(set(tokenizer) - {'source'}))} builds a "
                               "tokenizer; moe-surgeon keeps the base model's")
        source = tokenizer.get("source", source)
    elif tokenizer is not None:
        raise SurgeonError(f"{path}: tokenizer is a mapping (source: base), not {excerpt(repr(tokenizer), 40)}")
    if source is not None and source != "base" and by_key.get(source if isinstance(source, str) else "") != base_name:
        raise SurgeonError(f"{path}: tokenizer_source {excerpt(repr(source), 60)}: an export keeps the base model's "
                           "tokenizer; use `base` (or leave it out)")
    if config.get("chat_template") is not None:
        raise SurgeonError(f"{path}: chat_template: an export keeps the base model's chat template; leave it out")


def open_recipe_session(session_path: str | os.PathLike):
    """A saved session and its donors, for export."""
    from surgeon.core.session import load_session, refuse_mix_session

    session = load_session(session_path)
    if "prune" in session.extensions:  # before the mix refusal: no export directory would do either
        raise SurgeonError(f"{session_path}: a prune or merge-experts session: mergekit has no expert pruning or "
                           "merging, so no recipe makes this model")
    refuse_mix_session(session, session_path, "export a recipe from")
    return session, open_session_donors(session, session_path)
