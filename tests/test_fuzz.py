"""Property-based fuzzing of every input a user (or an attacker) hands moe-surgeon.

Each target takes generated input and must either work or raise SurgeonError with one line:
never another exception, never a changed input file. Safetensors headers also have an oracle:
a header we accept, the safetensors library must accept too, with the same tensors.

The suite runs a short profile; `bench/fuzz.py` runs these same targets for 10,000+ cases each.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surgeon.errors import SurgeonError

SHORT = settings(max_examples=60, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- a workspace of real files
class Workspace:
    """Two tiny real donors, a session made from them, and scratch files the targets overwrite."""

    def __init__(self, root: Path, donors: list[Path]):
        from surgeon.core.donor import open_donor
        from surgeon.core.plan import Assignment, Plan
        from surgeon.core.session import make_session, save_session

        self.root = root
        self.donors = [shutil.copytree(d, root / f"donor{i}") for i, d in enumerate(donors)]
        self.config = json.loads((self.donors[0] / "config.json").read_text())
        self.fuzzed = shutil.copytree(self.donors[0], root / "fuzzed")  # its files are overwritten
        self.shard = (self.donors[0] / "model.safetensors").read_bytes()
        self.session = root / "session.json"
        opened = {"A": open_donor(self.donors[0]), "B": open_donor(self.donors[1])}
        plan = Plan("A", [Assignment("experts", "B", (1,)), Assignment("expert", "B", None, (0, 2))])
        save_session(make_session(plan, opened, self.session), self.session)
        self.session_json = json.loads(self.session.read_text())
        self.base = opened["A"]
        self.opened = opened
        self.plan = plan
        self._export: Path | None = None

    @property
    def export(self) -> Path:
        """A real export of the session's plan in three shards, made on first use (the manifest
        target's); `verify` is a copy of it whose manifest the target overwrites."""
        if self._export is None:
            from surgeon.features.export import ExportRequest, run_export

            out = self.root / "export"
            run_export(ExportRequest(self.plan, self.opened, out, max_shard_size=40_000))
            shutil.copytree(out, self.root / "verify")
            self.manifest_json = json.loads((out / "moe-surgeon-manifest.json").read_text())
            self.export_files = {p.name: p.read_bytes() for p in out.iterdir()}
            self.donor_shards = {d: (d / "model.safetensors").read_bytes() for d in self.donors}
            self._export = out
        return self._export


def build_workspace(root: Path) -> Workspace:
    """For bench/fuzz.py, which has no pytest fixtures."""
    from tiny_models import make_donor

    return Workspace(root, [make_donor(root / f"src{i}", "olmoe", seed=i) for i in range(2)])


@pytest.fixture(scope="module")
def ws(donors_of, tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("fuzz"), donors_of("olmoe", 2))


def one_line(e: SurgeonError) -> None:
    # What a user sees: the CLI prints the message with its whitespace collapsed (so a name holding
    # a newline cannot break the line) and the workbench shows it in a modal. It must say something.
    assert " ".join(str(e).split()), repr(str(e))


def works_or_refuses(fn, *args):
    """The property every target shares: a result, or SurgeonError with one line."""
    try:
        return fn(*args)
    except SurgeonError as e:
        one_line(e)
        return None


# ---------------------------------------------------------------- strategies
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
json_value = st.recursive(
    json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
small_ints = st.one_of(st.integers(min_value=-3, max_value=20), st.integers(min_value=-(1 << 65), max_value=1 << 65))
digitish = st.sampled_from(["0", "1", "3", "²", "١", "01", "-1", ""]) | st.text("0123456789²١", max_size=3)
layer_names = st.builds(lambda layer, part, e: f"model.layers.{layer}.{part}".replace("E", e), digitish,
                        st.sampled_from(["mlp.experts.E.down_proj.weight", "self_attn.q_proj.weight", "E", "mlp.gate.weight"]),
                        digitish)
DTYPES = ["F32", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "F64", "F17", "f32", "", "C64", "F8_E8M0"]


@st.composite
def safetensors_files(draw) -> bytes:
    """Whole files: headers built from mostly-right pieces, then optionally damaged as bytes."""
    table: dict = {}
    if draw(st.booleans()):
        table["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
                                               json_value))
    pos = 0
    names = draw(st.lists(st.one_of(st.sampled_from(["a", "b", "model.embed_tokens.weight", "lm_head.weight"]),
                                    layer_names, st.text(max_size=10)), max_size=5))
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(small_ints if draw(st.booleans()) else st.integers(0, 4), max_size=3))
        size = 1
        for d in shape:
            size *= d
        nbytes = size * {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "F64": 8}.get(dtype, 1)
        begin = draw(st.one_of(st.just(pos), small_ints))
        end = draw(st.one_of(st.just(begin + nbytes), small_ints)) if isinstance(begin, int) else 0
        entry: dict = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        if draw(st.integers(0, 9)) == 0:
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(json_value)
        if draw(st.integers(0, 9)) == 0:
            del entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
        table[name] = entry
        pos = max(0, end) if isinstance(end, int) and end < (1 << 20) else pos
    raw = json.dumps(table, allow_nan=True).encode()
    if names and draw(st.integers(0, 7)) == 0:  # a duplicated key, which a dict cannot hold
        raw = raw[:-1] + b', "%s": %s}' % (json.dumps(names[0])[1:-1].encode(), json.dumps(table[names[0]]).encode())
    if draw(st.integers(0, 5)) == 0:
        raw = draw(st.binary(max_size=40)) if draw(st.booleans()) else raw[: draw(st.integers(0, len(raw)))]
    data_len = draw(st.one_of(st.just(pos), st.integers(0, pos + 16)))
    length = draw(st.one_of(st.just(len(raw)), st.integers(0, len(raw) + 16), st.integers(0, (1 << 64) - 1)))
    blob = struct.pack("<Q", length) + raw + bytes(min(data_len, 1 << 16))
    if draw(st.integers(0, 5)) == 0:  # flip, cut or insert bytes anywhere
        i = draw(st.integers(0, len(blob)))
        cut = draw(st.integers(0, 8))
        blob = blob[:i] + draw(st.binary(max_size=8)) + blob[i + cut:]
    return blob


@st.composite
def mutated_json(draw, original, deep=True):
    """`original` with a few keys at any depth replaced, removed or added; or bytes (with `deep`,
    nesting deeper than Python's recursion limit)."""
    if draw(st.integers(0, 9)) == 0:
        nested = [b"[" * 3000, b'{"a":' * 3000] if deep else [b"[]"]
        return draw(st.one_of(st.binary(max_size=60), st.sampled_from(nested)))
    doc = json.loads(json.dumps(original))
    for _ in range(draw(st.integers(1, 4))):
        node = doc
        while isinstance(node, (dict, list)) and node and draw(st.integers(0, 2)):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            if not isinstance(node[key], (dict, list)) or not node[key]:
                break
            node = node[key]
        if not isinstance(node, (dict, list)) or not node:
            continue
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        action = draw(st.integers(0, 3))
        if action == 0 and isinstance(node, dict):
            del node[key]
        elif action == 1 and isinstance(node, dict):
            node[draw(st.text(max_size=8))] = draw(json_value)
        elif isinstance(node[key], int) and not isinstance(node[key], bool) and draw(st.booleans()):
            node[key] = node[key] + draw(st.integers(-3, 3))  # near misses find off-by-ones
        else:
            node[key] = draw(json_value)
    return json.dumps(doc, allow_nan=True).encode()


COMPONENT_WORDS = ["attention", "router", "experts", "shared_expert", "gate", "norms", "mlp", "layer_gate",
                   "embedding", "final_norm", "lm_head", "expert:", "expert:0", "expert:1-2,3"]
range_text = st.one_of(
    st.sampled_from(["all", "0", "1", "0-1", "1-0", "0,1", "", "-1", "1-", "a", " 1 ", "0-1,1", "١", "²"]),
    st.builds(lambda a, b: f"{a}-{b}", small_ints, small_ints),
    st.lists(small_ints, min_size=1, max_size=4).map(lambda xs: ",".join(map(str, xs))),
)
specs = st.one_of(
    st.text(max_size=24),
    st.builds(lambda c, r, at: c + (("@" + r) if at else ""), st.sampled_from(COMPONENT_WORDS), range_text, st.booleans()),
    st.builds(lambda r, l: f"expert:{r}@{l}", range_text, range_text),
)
OPTION_WORDS = ["limit", "seed", "shots", "cot", "extract", "max_new_tokens", "template", "fmt", "bogus", ""]
probe_specs = st.one_of(
    st.text(max_size=30),
    st.builds(
        lambda kind, data, opts: f"{kind}:{data}" + "".join(f",{k}={v}" for k, v in opts),
        st.sampled_from(["mc", "em", "ppl", "kl", "xx", ""]),
        st.sampled_from(["arith", "demo", "nope.jsonl", "", "/", "..", "arith.jsonl"]) | st.text(max_size=8),
        st.lists(st.tuples(st.sampled_from(OPTION_WORDS), st.one_of(small_ints.map(str), st.text(max_size=6))),
                 max_size=3),
    ),
)


# mergekit configs: mostly-right pieces (the workspace's donors, 0/1 weights on real tensor names, layer
# ranges near the real two layers), each possibly swapped for a wrong type; then YAML's own traps.
MERGE_METHODS = ["passthrough", "linear", "task_arithmetic", "ties", "slerp", "", "Linear"]
FILTERS = ["self_attn", "mlp.experts", "mlp.gate", "mlp.experts.gate_up_proj", "layers.1.", ".0.", "norm",
           "input_layernorm", "lm_head", "embed_tokens", "*", "", "model.layers.1.mlp.experts.0."]
MERGEKIT_DTYPES = ["bfloat16", "float16", "float32", "int8", "fp8", "", "BF16"]


def mostly(good, bad):
    """`good` four times in five: a config wrong at every level at once stops at its first field."""
    return st.sampled_from("ggbgg").flatmap(lambda c: good if c == "g" else bad)  # Hypothesis favours ends


def model_refs(ws):
    real = [str(ws.donors[0]), str(ws.donors[1]), "../donor0", "../donor1/", "~/nope", "demo:base", "demo:nope",
            "", "/nonexistent", str(ws.root), str(ws.session), "/dev/null", "../donor0+../donor1",
            str(ws.donors[1]) + "+lora", "../recipes/fuzzed.yml", "."]
    ref = mostly(st.sampled_from(real[:4]), st.sampled_from(real) | st.text(max_size=8))
    return mostly(ref, st.one_of(ref.map(lambda r: {"model": r}), ref.map(lambda r: {"model": {"path": r}}),
                                 st.just({"model": {}}), json_leaf))


def weights():
    one = mostly(st.sampled_from([0, 1]), st.sampled_from([1.0, 0.5, -1, True]) | json_leaf)
    cond = mostly(st.fixed_dictionaries({"filter": mostly(st.sampled_from(FILTERS), json_leaf), "value": one}),
                  st.fixed_dictionaries({}, optional={"filter": st.sampled_from(FILTERS), "value": json_value}))
    conds = st.tuples(st.lists(cond, max_size=4), one).map(lambda t: t[0] + [{"value": t[1]}])
    return mostly(st.one_of(one, conds, conds), st.lists(one, max_size=3) | json_value)


def parameters():
    return mostly(st.fixed_dictionaries({"weight": weights()}, optional={"normalize": st.booleans()}),
                  st.fixed_dictionaries({}, optional={"weight": weights(), "normalize": json_leaf,
                                                      "density": json_leaf}) | json_leaf)


@st.composite
def mergekit_configs(draw, ws) -> dict:
    refs = model_refs(ws)
    config: dict = {"merge_method": draw(mostly(st.sampled_from(MERGE_METHODS[:3]),
                                                st.sampled_from(MERGE_METHODS) | json_leaf))}
    if draw(st.integers(0, 2)):
        config["base_model"] = draw(refs)
    form = draw(mostly(st.sampled_from(["models", "slices"]), st.sampled_from(["both", "neither"])))
    if form in ("models", "both"):
        entry = mostly(st.fixed_dictionaries({"model": refs, "parameters": parameters()}),
                       st.fixed_dictionaries({"model": refs}, optional={"parameters": json_value}) | json_leaf)
        config["models"] = draw(mostly(st.lists(entry, min_size=1, max_size=3), json_value))
    if form in ("slices", "both"):
        bound = mostly(st.integers(0, 2), st.integers(-1, 3) | small_ints | json_leaf)
        ranges = st.lists(bound, min_size=2, max_size=2)
        source = st.fixed_dictionaries({"model": refs, "layer_range": mostly(ranges, st.lists(bound) | json_leaf)},
                                       optional={"parameters": parameters()})
        slice_ = st.fixed_dictionaries({"sources": mostly(st.lists(source, min_size=1, max_size=2), json_value)},
                                       optional={"parameters": parameters()})
        config["slices"] = draw(mostly(st.lists(slice_, min_size=1, max_size=3), json_value))
    for key, value in [("parameters", parameters()), ("dtype", st.sampled_from(MERGEKIT_DTYPES) | json_leaf),
                       ("out_dtype", st.sampled_from(MERGEKIT_DTYPES)), ("tokenizer_source", refs),
                       ("modules", json_value)]:
        if draw(st.integers(0, 7)) == 0:
            config[key] = draw(value)
    return config


YAML_TRAPS = [
    b"[" * 3000, b"- " * 3000 + b"x", b"a: &a [*a]\n", b"&a [*a, *a]",  # too deep; an alias inside itself
    b"a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    b"d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    b"f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]\n",  # ten million values
    b"merge_method: !!python/object/apply:os.system [echo]\n", b"merge_method: !function x.y\n",
    b"merge_method: linear\nmodels: !!binary aGVsbG8=\n", b"merge_method: linear\nmodels: !!set {a, b}\n",
    b"merge_method: linear\nmodels: [2001-12-14, 1e999, 0x1p3, .nan, -.inf]\n",
    b"merge_method: linear\nmodels:\n- model: 99999999999999999999999999999999999999\n",
    b"? [a, b]\n: c\n", b"{[1]: 2}", b"merge_method: linear\nmerge_method: passthrough\n",
    b"base: &b {model: x}\nmerge_method: passthrough\nmodels: [{<<: *b}]\n", b"--- 1\n--- 2\n",
    b"\xef\xbb\xbfmerge_method: linear\n", b"\xff\xfe", b"merge_method: \xc3\x28\n", b"\x00", b"\t", b"",
]


@st.composite
def recipe_bytes(draw, ws) -> bytes:
    """A mergekit config as YAML (or as JSON, which YAML reads too), sometimes damaged as bytes, or
    one of YAML's traps."""
    import yaml

    pick = draw(st.integers(0, 9))
    if pick == 0:
        return draw(st.sampled_from(YAML_TRAPS) | st.binary(max_size=60))
    config = draw(mergekit_configs(ws))
    config = {k: config[k] for k in draw(st.permutations(list(config)))}  # damage below lands in any field
    if pick == 1:
        raw = json.dumps(config, allow_nan=True).encode()
    else:
        raw = yaml.safe_dump(config, sort_keys=False, allow_unicode=draw(st.booleans())).encode()
    if draw(st.integers(0, 5)) == 0:  # flip, cut or insert bytes anywhere
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + draw(st.binary(max_size=8) | st.sampled_from([b"&a ", b"*a", b"!!", b": ", b"\n- ", b"{"]))\
            + raw[i + draw(st.integers(0, 8)):]
    return raw


TASKS = Path(__file__).parent / "data" / "lmeval_tasks"
TASK_KEYS = ["task", "dataset_path", "dataset_kwargs", "output_type", "training_split", "fewshot_split",
             "test_split", "num_fewshot", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list",
             "metadata", "include", "process_docs", "filter_list", "generation_kwargs", "class", "group",
             "target_delimiter", "fewshot_delimiter", "description"]
TASK_VALUES = st.one_of(
    json_value, st.sampled_from(["{{question}}", "{{choices.text}}", "{{ cycler.__init__.__globals__ }}",
                                 "{% for x in range(10**9) %}{% endfor %}", "test", "train", "json", "acc",
                                 "multiple_choice", "generate_until", "loglikelihood_rolling", "inc.yaml",
                                 "../arc_tiny.yaml", "/dev/zero", "fuzzed.yaml"]))


@st.composite
def task_yaml_cases(draw, ws) -> tuple[bytes, bytes]:
    """(a task YAML, a YAML it may include): arc_tiny's config with keys replaced, dropped or added,
    `!function` tags among the values, written as YAML and sometimes damaged; or one of YAML's traps."""
    import yaml

    pick = draw(st.integers(0, 9))
    if pick == 0:
        return draw(st.sampled_from(YAML_TRAPS) | st.binary(max_size=60)), b""
    config = yaml.safe_load((TASKS / "arc_tiny.yaml").read_text())
    config["task"] = "fuzzed_task"
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(TASK_KEYS + list(config)))
        if draw(st.integers(0, 3)) == 0:
            config.pop(key, None)
        else:
            config[key] = draw(TASK_VALUES)
    raw = yaml.safe_dump(config, sort_keys=False, allow_unicode=True).encode()
    if draw(st.integers(0, 3)) == 0:  # code the task would run: must never run untrusted
        raw += draw(st.sampled_from([b"process_docs: !function utils.p\n", b"doc_to_text: !function utils.p\n",
                                     b"metric_list: [{metric: !function utils.p}]\n"]))
    if draw(st.integers(0, 5)) == 0:
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + draw(st.binary(max_size=8) | st.sampled_from([b"&a ", b"*a", b"!!", b": ", b"\n- ", b"{"]))\
            + raw[i + draw(st.integers(0, 8)):]
    included = draw(st.sampled_from([b"", b"process_docs: !function utils.p\n", b"include: fuzzed.yaml\n",
                                     b"include: inc.yaml\n", b"num_fewshot: 1\n"]) | st.binary(max_size=40))
    return raw, included


def manifest_cases(ws):
    """(manifest bytes, whether to check donors too): the real export's manifest with keys replaced,
    removed or added at any depth, or with one claim made false in a way verify can see."""
    ws.export
    return st.tuples(st.one_of(mutated_json(ws.manifest_json), false_claims(ws)), st.booleans())


def _hex_flip(h: str, i: int) -> str:
    i %= max(1, len(h))
    return h[:i] + ("0" if h[i:i + 1] != "0" else "1") + h[i + 1:]


@st.composite
def false_claims(draw, ws) -> bytes:
    doc = json.loads(json.dumps(ws.manifest_json))
    tensor = draw(st.sampled_from(sorted(doc["tensors"])))
    entry = doc["tensors"][tensor]
    shard = draw(st.sampled_from(sorted(doc["shards"])))
    side = draw(st.sampled_from(sorted(doc["files"])))
    at = draw(st.integers(0, 40))
    outside = st.sampled_from(["../donor0/model.safetensors", "/etc/passwd", "..", "/", "", ".", "../export/" + shard,
                               "moe-surgeon-manifest.json", shard + "/x", "a\x00b", "config.json"])
    change = draw(st.integers(0, 12))
    if change == 0:
        entry["hash"] = _hex_flip(entry["hash"], at)
    elif change == 1:
        doc["shards"][shard] = _hex_flip(doc["shards"][shard], at)
    elif change == 2:
        doc["files"][side] = _hex_flip(doc["files"][side], at)
    elif change == 3:
        entry["offsets"][draw(st.integers(0, 1))] += draw(st.sampled_from([-1, 1, 1 << 40, -(1 << 70)]))
    elif change == 4:
        entry["shape"] = draw(st.lists(small_ints, max_size=3))
    elif change == 5:
        entry["dtype"] = draw(st.sampled_from(DTYPES))
    elif change == 6:
        entry["shard"] = draw(st.sampled_from(sorted(doc["shards"])) | outside)
    elif change == 7:
        doc["shards"][draw(outside)] = doc["shards"].pop(shard)
    elif change == 8:
        doc["files"][draw(outside)] = doc["files"].pop(side)
    elif change == 9:
        doc["tensors"][draw(st.sampled_from(["x", tensor + ".", "model.layers.9.mlp.gate.weight"]))] = \
            doc["tensors"].pop(tensor)
    elif change == 10:
        donor = draw(st.sampled_from(sorted(doc["donors"])))
        doc["donors"][donor][draw(st.sampled_from(["path", "path_from_export"]))] = draw(outside | json_leaf)
    elif change == 11:
        entry["source"] = draw(st.fixed_dictionaries({"donor": st.sampled_from(["A", "B", "C"]) | json_leaf},
                                                     optional={"name": st.sampled_from(sorted(doc["tensors"])) | json_leaf,
                                                               "experts": json_value}) | json_value)
    else:
        doc[draw(st.sampled_from(["tensor_hash", "shard_hash", "manifest_version"]))] = draw(
            st.sampled_from(["xxh3-64", "sha256", "xxh3-128-tree16m", "xxh3-128", 1, 2, "1", True]) | json_leaf)
    return json.dumps(doc, allow_nan=True).encode()


# ---------------------------------------------------------------- targets (also run by bench/fuzz.py)
def unchanged(path: Path, before: bytes) -> None:
    assert path.read_bytes() == before, f"{path} was changed"


def header_target(ws: Workspace, blob: bytes) -> None:
    from surgeon.io.safetensors_file import read_header

    path = ws.root / "fuzzed.safetensors"
    path.write_bytes(blob)
    header = works_or_refuses(read_header, str(path))
    unchanged(path, blob)
    if header is None:
        return
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:  # what we accept, the reference reader accepts
        assert sorted(f.keys()) == sorted(header.tensors)
        for name, info in header.tensors.items():
            assert list(f.get_slice(name).get_shape()) == list(info.shape)
    assert sum(t.nbytes for t in header.tensors.values()) == header.size - 8 - len(header.raw)


def donor_with_shard_target(ws: Workspace, case: tuple[bytes, bool]) -> None:
    """A fuzzed shard inside a real donor directory, opened and summarised as `inspect` does.
    With a bare config half the time, so that odd tensor names get past the config checks."""
    from surgeon.cli.inspect import inspect_summary
    from surgeon.core.donor import open_donor

    blob, bare = case
    shard = ws.fuzzed / "model.safetensors"
    shard.write_bytes(blob)
    (ws.fuzzed / "config.json").write_text(json.dumps({"model_type": "olmoe"} if bare else ws.config))
    donor = works_or_refuses(open_donor, ws.fuzzed)
    if donor is not None:
        json.dumps(works_or_refuses(inspect_summary, donor))
        works_or_refuses(lambda: (donor.ordered_names, donor.part_groups))
    unchanged(shard, blob)


def config_target(ws: Workspace, raw: bytes) -> None:
    from surgeon.cli.inspect import inspect_summary
    from surgeon.core.donor import open_donor

    (ws.fuzzed / "model.safetensors").write_bytes(ws.shard)
    cfg = ws.fuzzed / "config.json"
    cfg.write_bytes(raw)
    donor = works_or_refuses(open_donor, ws.fuzzed)
    if donor is not None:
        json.dumps(works_or_refuses(inspect_summary, donor))
        donor.fingerprint
    unchanged(cfg, raw)


def session_target(ws: Workspace, raw: bytes) -> None:
    from surgeon.core.resolve import resolve
    from surgeon.core.session import load_session, open_session_donors

    path = ws.root / "fuzzed-session.json"
    path.write_bytes(raw)

    def replay():
        session = load_session(path)
        donors = open_session_donors(session, ws.session)
        return resolve(session.plan, donors)

    works_or_refuses(replay)
    unchanged(path, raw)


def plan_spec(ws: Workspace, spec: str):
    from surgeon.core.plan import Plan, check_assignment, parse_spec
    from surgeon.core.resolve import resolve

    a = parse_spec(spec, "B")
    check_assignment(a, ws.base.anatomy, "A")
    return resolve(Plan("A", [a]), ws.opened)


def spec_target(ws: Workspace, spec: str) -> None:
    works_or_refuses(plan_spec, ws, spec)


def probe_target(ws: Workspace, text: str) -> None:
    from surgeon.probes import parse_probe, spec_from_json
    from surgeon.probes.run import load_probe_data

    spec = works_or_refuses(parse_probe, text)
    if spec is None:
        return
    assert spec_from_json(spec.to_json()) == spec  # what a session records reads back the same
    spec.label
    works_or_refuses(load_probe_data, spec)


def recipe_target(ws: Workspace, raw: bytes) -> None:
    """`recipe import`: a session, saved and read back as the command saves it, or one line."""
    from surgeon.core.session import load_session, save_session
    from surgeon.features.recipe import import_recipe

    folder = ws.root / "recipes"  # a level down, so that ../donor0 names a real donor
    folder.mkdir(exist_ok=True)
    path, saved = folder / "fuzzed.yml", ws.root / "recipe-session.json"
    path.write_bytes(raw)
    session = works_or_refuses(import_recipe, path, saved)
    unchanged(path, raw)
    if session is not None:
        save_session(session, saved)
        assert load_session(saved).plan == session.plan


def task_yaml_target(ws: Workspace, case: tuple[bytes, bytes]) -> None:
    """`--probe lmeval:FILE` without --trust-task-code: a loaded task or one line, the files unchanged,
    and the Python beside the YAML never run (its import would leave a marker file)."""
    from surgeon.probes import ProbeSpec
    from surgeon.probes.lmeval import load_task

    raw, included = case
    folder = ws.root / "tasks"
    if not folder.exists():
        folder.mkdir()
        for f in ("arc_tiny_train.jsonl", "arc_tiny_test.jsonl"):
            shutil.copy(TASKS / f, folder / f)
        (folder / "utils.py").write_text(f"open({str(folder / 'ran')!r}, 'w')\ndef p(x):\n    return x\n")
    path = folder / "fuzzed.yaml"
    path.write_bytes(raw)
    (folder / "inc.yaml").write_bytes(included)
    here = os.getcwd()
    os.chdir(folder)  # a data file pattern resolves from here: the scratch folder, not the whole checkout
    try:
        works_or_refuses(load_task, ProbeSpec("lmeval", str(path)))
    finally:
        os.chdir(here)
    unchanged(path, raw)
    assert not (folder / "ran").exists(), "a task's Python ran without --trust-task-code"


MANIFEST_CLAIMS = ("shard", "dtype", "shape", "offsets", "hash")


def manifest_target(ws: Workspace, case: tuple[bytes, bool]) -> None:
    """`verify OUT [--donors]` on a copy of a real export with a fuzzed manifest: a result or one line;
    no file changed, in the copy or in the donors; and a pass only for claims that are true (every
    shard, side file and tensor hash, range, dtype and shape the real manifest has)."""
    from surgeon.features.verify import run_verify
    from surgeon.io.manifest import MANIFEST_FILE

    raw, donors = case
    copy = ws.root / "verify"
    (copy / MANIFEST_FILE).write_bytes(raw)
    result = works_or_refuses(lambda: run_verify(copy, donors=donors))
    assert sorted(p.name for p in copy.iterdir()) == sorted(ws.export_files)
    for name, data in ws.export_files.items():
        unchanged(copy / name, raw if name == MANIFEST_FILE else data)
    for donor in ws.donors:
        unchanged(donor / "model.safetensors", ws.donor_shards[donor])
    if result is None or not result.ok:
        return
    doc, real = json.loads(raw), ws.manifest_json
    for key in ("manifest_version", "tensor_hash", "shard_hash", "shards", "files"):
        assert doc.get(key, real[key]) == real[key], f"verified a manifest whose {key} is {doc.get(key)!r}"
    assert doc["tensors"].keys() == real["tensors"].keys(), "verified a manifest that lists other tensors"
    for name, entry in doc["tensors"].items():
        claims = {k: entry.get(k) for k in MANIFEST_CLAIMS}
        assert claims == {k: real["tensors"][name][k] for k in MANIFEST_CLAIMS}, f"verified {name}: {claims}"


def session_bytes(ws, deep=False):
    # Not deep here: load_session lets RecursionError through (test_deeply_nested_session below);
    # bench/fuzz.py runs the deep variant as its own target.
    return mutated_json(ws.session_json, deep)


def config_bytes(ws):
    return mutated_json(ws.config)


# name -> (strategy given the workspace, target)
TARGETS = {
    "header": (lambda ws: safetensors_files(), header_target),
    "donor_shard": (lambda ws: st.tuples(safetensors_files(), st.booleans()), donor_with_shard_target),
    "config": (config_bytes, config_target),
    "session": (session_bytes, session_target),
    "spec": (lambda ws: specs, spec_target),
    "probe": (lambda ws: probe_specs, probe_target),
    "recipe": (recipe_bytes, recipe_target),
    "manifest": (manifest_cases, manifest_target),
    "task_yaml": (task_yaml_cases, task_yaml_target),
}


@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_target(ws, name):
    strategy, target = TARGETS[name]
    given(strategy(ws))(SHORT(lambda value: target(ws, value)))()


def test_deeply_nested_session(ws):
    # found by bench/fuzz.py: json's RecursionError escaped load_session as a traceback
    session_target(ws, b"[" * 3000)


def test_spec_with_a_huge_range(ws):
    # found by bench/fuzz.py: parse_ranges expanded the range before any bound check
    with pytest.raises(SurgeonError, match="spans 120797555991565228 values"):
        plan_spec(ws, "expert:0,1@5-120797555991565232")



@pytest.mark.parametrize("raw, message", [
    # found by bench/fuzz.py: each escaped import_recipe as a TypeError or IndexError
    (b"merge_method: linear\nmodels: true\n", "models: expected a list, not bool"),
    (b"merge_method: passthrough\nslices: 1180893\n", "slices: expected a list, not int"),
    (b"merge_method: passthrough\nslices: [null, null]\n", "names no model"),
    (b"merge_method: passthrough\nslices:\n- sources: [{model: ../donor0, layer_range: [0, 36893488147419103232]}]\n",
     "is not a range of the base's 2 layers"),  # it filled a dict with every layer of the range until out of memory
    (b"merge_method: passthrough\nslices:\n- sources: 1.0e-5\n", "slices/0/sources: expected a list, not float"),
    (b"merge_method: passthrough\nslices:\n- sources: [../donor0]\n", "slices/0/sources/0: expected {model: ..."),
    (b"merge_method: linear\nmodels:\n- {model: ../donor0, parameters: 392}\n",
     "weight of ../donor0: parameters 392 is not a mapping"),
])
def test_recipe_of_the_wrong_shape(ws, raw, message):
    from surgeon.features.recipe import import_recipe

    recipe_target(ws, raw)
    with pytest.raises(SurgeonError, match=message):
        import_recipe(ws.root / "recipes" / "fuzzed.yml")


def edited_manifest(ws, edit) -> bytes:
    doc = json.loads(json.dumps(ws.manifest_json))
    edit(doc)
    return json.dumps(doc).encode()


def test_manifest_with_an_edited_tensor_hash_does_not_verify(ws):
    # found by bench/fuzz.py: verify read tensor hashes only in a shard whose own hash differed, so a
    # manifest claiming another hash for a tensor passed while its shard hash still held
    from surgeon.features.verify import run_verify

    ws.export
    name = sorted(ws.manifest_json["tensors"])[3]
    raw = edited_manifest(ws, lambda m: m["tensors"][name].update(hash="0" * 32))
    manifest_target(ws, (raw, False))
    assert f"tensor {name} differs from the manifest" in run_verify(ws.root / "verify").problem


@pytest.mark.parametrize("edit, message", [
    # found by the manifest target: TypeError, AttributeError, KeyError escaped verify, or it passed
    (lambda m: m["tensors"].update(x=[1]), "tensors/x: expected {shard, dtype, shape, offsets, hash}"),
    (lambda m: next(iter(m["tensors"].values())).update(offsets=[5]), "offsets: [5] is not [start, end]"),
    (lambda m: m["shards"].update({"a.safetensors": None}), "shards/a.safetensors: hash None is not a string"),
    (lambda m: m.update(files=[]), "files: expected a mapping"),
    (lambda m: m["donors"].update(A="x"), "donors/A: expected {path: ..., path_from_export: ...}"),
    (lambda m: m.update(shard_hash="sha256"), "shard_hash: 'sha256' (this moe-surgeon computes xxh3-128-tree16m)"),
])
def test_malformed_manifest_is_one_line(ws, edit, message):
    from surgeon.features.verify import run_verify

    ws.export
    manifest_target(ws, (edited_manifest(ws, edit), True))
    with pytest.raises(SurgeonError, match=re.escape(message)):
        run_verify(ws.root / "verify")


def test_expert_ranges_past_the_tensor_fail_verify_instead_of_reading_forever(ws):
    # found writing the manifest target: an expert range past both files compared their empty reads, for ever
    from surgeon.features.verify import run_verify

    ws.export
    name = sorted(ws.manifest_json["tensors"])[0]
    raw = edited_manifest(ws, lambda m: m["tensors"][name]["source"].update(
        experts=[{"donor": "A", "from": 1 << 40, "to": 1 << 41}]))
    manifest_target(ws, (raw, True))
    assert "go past the tensor" in run_verify(ws.root / "verify", donors=True).problem


# ---------------------------------------------------------------- a few runs of the command line
def cli(*argv) -> tuple[int, str, str]:
    from surgeon.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def assert_exit_2_one_line(rc, err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("moe-surgeon: error: "), (rc, err)


CLI = settings(SHORT, max_examples=8)


@CLI
@given(blob=safetensors_files())
def test_cli_inspect_fuzzed_shard(ws, blob):
    shard = ws.fuzzed / "model.safetensors"
    shard.write_bytes(blob)
    (ws.fuzzed / "config.json").write_text(json.dumps(ws.config))
    rc, out, err = cli("inspect", ws.fuzzed)
    if rc != 0:
        assert_exit_2_one_line(rc, err)
    unchanged(shard, blob)


@CLI
@given(raw=st.sampled_from([b'{"num_hidden_layers": "two"}', b"[", b"\xff\xfe"]) | st.binary(max_size=30))
def test_cli_inspect_fuzzed_config(ws, raw):
    (ws.fuzzed / "model.safetensors").write_bytes(ws.shard)
    (ws.fuzzed / "config.json").write_bytes(raw)
    assert_exit_2_one_line(*cli("inspect", ws.fuzzed)[::2])


@CLI
@given(spec=specs)
def test_cli_export_fuzzed_spec(ws, spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "hybrid"
    rc, _, err = cli("export", out, "--base", ws.donors[0], "--take", f"{spec}={ws.donors[1]}")
    if rc != 0:
        assert_exit_2_one_line(rc, err)
        assert not out.exists()  # nothing partial
    else:
        shutil.rmtree(out)


@CLI
@given(raw=st.data())
def test_cli_replay_fuzzed_session(ws, raw):
    blob = raw.draw(session_bytes(ws))
    path = ws.root / "cli-session.json"
    path.write_bytes(blob)
    rc, _, err = cli("replay", path)
    if rc != 0:
        assert_exit_2_one_line(rc, err)
    unchanged(path, blob)
