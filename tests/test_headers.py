"""Hostile checkpoints: every way a safetensors header or a config.json can lie is one line naming
the file, the tensor or field, and both values, before anything plans surgery on it.

Bad files are written as raw bytes (8-byte little-endian header length, JSON, data), so each
test builds exactly the lie it names.
"""

import json
import shutil
import struct

import pytest
from tiny_models import make_donor

from surgeon.cli.main import main
from surgeon.core.donor import open_donor
from surgeon.errors import SurgeonError
from surgeon.io.safetensors_file import read_header

# Two F32 tensors of two elements each, back to back: 16 data bytes.
GOOD = {
    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
}


def write_raw(path, header, data=b"\0" * 16):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def refused(path, *needles):
    with pytest.raises(SurgeonError) as e:
        read_header(str(path))
    message = str(e.value)
    assert len(message.splitlines()) == 1, message
    for n in (str(path), *needles):
        assert n in message, (n, message)
    return message


def with_tensor(name, **fields):
    return {**GOOD, name: {**GOOD[name], **fields}}


def test_good_header_reads_and_the_safetensors_library_agrees(tmp_path):
    from safetensors import safe_open

    f = write_raw(tmp_path / "ok.safetensors", {"__metadata__": {"format": "pt"}, **GOOD})
    h = read_header(str(f))
    assert {n: (t.shape, t.nbytes) for n, t in h.tensors.items()} == {"a": ((2,), 8), "b": ((2,), 8)}
    assert h.metadata == {"format": "pt"}
    with safe_open(str(f), "np") as g:
        assert sorted(g.keys()) == ["a", "b"]


def test_negative_dim(tmp_path):
    f = write_raw(tmp_path / "neg.safetensors", with_tensor("b", shape=[-2]))
    refused(f, "tensor b", "shape [-2]", "non-negative integers")


@pytest.mark.parametrize("dim", ["2", 2.0, True, None])
def test_non_integer_dim(tmp_path, dim):
    f = write_raw(tmp_path / "dim.safetensors", with_tensor("a", shape=[dim]))
    refused(f, "tensor a", f"shape [{json.dumps(dim)}]")


def test_overlapping_ranges(tmp_path):
    # b starts inside a; the last 4 bytes belong to nobody, but the overlap is what is wrong
    f = write_raw(tmp_path / "overlap.safetensors", with_tensor("b", data_offsets=[4, 12]))
    refused(f, "tensor b", "bytes 4-12", "overlaps tensor a", "ends at byte 8")


def test_gap_between_tensors(tmp_path):
    f = write_raw(tmp_path / "gap.safetensors", with_tensor("b", data_offsets=[12, 20]), b"\0" * 20)
    refused(f, "gap of 4 bytes", "tensor a", "ends at byte 8", "tensor b starts at byte 12")


def test_gap_at_the_start(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    refused(write_raw(tmp_path / "lead.safetensors", header, b"\0" * 12), "gap of 4 bytes", "start of the data")


def test_bytes_after_the_last_tensor(tmp_path):
    f = write_raw(tmp_path / "tail.safetensors", GOOD, b"\0" * 24)
    refused(f, "end at data byte 16", "holds 24 data bytes")


def test_duplicated_key(tmp_path):
    a = json.dumps(GOOD["a"])
    raw = ('{"a": %s, "b": %s, "a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}'
           % (a, json.dumps(GOOD["b"]))).encode()
    refused(write_raw(tmp_path / "dup.safetensors", raw), "key a appears twice", '"F32"', '"F16"')


def test_duplicated_field_inside_a_tensor(tmp_path):
    raw = b'{"a": {"dtype": "F32", "dtype": "I32", "shape": [4], "data_offsets": [0, 16]}}'
    refused(write_raw(tmp_path / "dupfield.safetensors", raw), "key dtype appears twice", '"F32"', '"I32"')


def test_unknown_dtype(tmp_path):
    refused(write_raw(tmp_path / "dtype.safetensors", with_tensor("a", dtype="F17")), "tensor a", "unknown dtype", "F17")


def test_offsets_out_of_bounds(tmp_path):
    f = write_raw(tmp_path / "oob.safetensors", with_tensor("b", data_offsets=[8, 16]), b"\0" * 12)
    refused(f, "tensor b", f"ends at byte {8 + len(json.dumps(GOOD)) + 16}", "has only")


@pytest.mark.parametrize("offsets", [[8], [16, 8], [8, "16"], [-8, 0]])
def test_malformed_offsets(tmp_path, offsets):
    f = write_raw(tmp_path / "offs.safetensors", with_tensor("b", data_offsets=offsets))
    refused(f, "tensor b", f"data_offsets {json.dumps(offsets)}")


def test_length_disagrees_with_shape(tmp_path):
    f = write_raw(tmp_path / "len.safetensors", with_tensor("b", shape=[3]))
    refused(f, "tensor b", "spans 8 bytes", "F32[3] needs 12")


def test_shape_overflowing_64_bits(tmp_path):
    f = write_raw(tmp_path / "huge.safetensors", with_tensor("b", shape=[1 << 40, 1 << 40, 0], data_offsets=[8, 8]))
    refused(f, "tensor b", "overflows 64 bits")


@pytest.mark.parametrize("metadata", [{"format": 1}, ["pt"], "pt"])
def test_metadata_is_a_map_of_strings(tmp_path, metadata):
    f = write_raw(tmp_path / "meta.safetensors", {"__metadata__": metadata, **GOOD})
    refused(f, "__metadata__", json.dumps(metadata))


def test_entry_not_an_object(tmp_path):
    refused(write_raw(tmp_path / "entry.safetensors", {**GOOD, "c": [1, 2]}, b"\0" * 16), "tensor c", "[1, 2]")


def test_lone_surrogate_name(tmp_path):
    raw = json.dumps({"a\ud800": GOOD["a"], "b": GOOD["b"]}).encode()
    refused(write_raw(tmp_path / "utf.safetensors", raw), "not valid UTF-8")


def test_control_characters_in_a_name_stay_on_one_line(tmp_path):
    f = write_raw(tmp_path / "nl.safetensors", {**GOOD, "evil\nname": {"dtype": "F32", "shape": [9], "data_offsets": [16, 20]}}, b"\0" * 20)
    refused(f, "'evil\\nname'")


def test_deeply_nested_header(tmp_path):
    refused(write_raw(tmp_path / "deep.safetensors", b"[" * 100_000), "nested too deeply")


# ---------------------------------------------------------------- config.json against the tensors
@pytest.fixture
def donor_dir(donors_of, tmp_path):
    return shutil.copytree(donors_of("olmoe", 2)[0], tmp_path / "donor")  # 2 layers, 4 experts


def set_config(d, **fields):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(fields)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def refused_config(d, *needles):
    with pytest.raises(SurgeonError) as e:
        open_donor(d)
    message = str(e.value)
    assert len(message.splitlines()) == 1, message
    for n in (str(d / "config.json"), *needles):
        assert n in message, (n, message)


def test_tiny_donor_config_agrees(donor_dir):
    assert open_donor(donor_dir).anatomy.num_layers == 2


@pytest.mark.parametrize("layers, held", [(1, "layers 0-1"), (3, "layers 0-1")])
def test_layer_count_mismatch(donor_dir, layers, held):
    refused_config(set_config(donor_dir, num_hidden_layers=layers), f"num_hidden_layers is {layers}", held)


def test_expert_count_mismatch(donor_dir):
    refused_config(set_config(donor_dir, num_experts=2), "num_experts is 2", "layer 0 holds 4 experts (0-3)")


def test_expert_count_mismatch_mixtral(tmp_path):
    d = set_config(make_donor(tmp_path / "mixtral", "mixtral", seed=0), num_local_experts=8)
    refused_config(d, "num_local_experts is 8", "holds 4 experts")


def test_missing_layer(donor_dir):
    header = read_header(str(donor_dir / "model.safetensors"))
    assert any(n.startswith("model.layers.1.") for n in header.tensors)
    # rename layer 1 to layer 2 in place: the header length must stay the same
    raw = header.raw.replace(b"model.layers.1.", b"model.layers.2.")
    f = donor_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:8] + raw + data[8 + len(raw):])
    refused_config(donor_dir, "num_hidden_layers is 2", "no layer 1")


@pytest.mark.parametrize("key, value, needle", [
    ("vocab_size", 65, "has 64 rows"),
    ("hidden_size", 48, "has 32 columns"),
])
def test_embedding_disagrees(donor_dir, key, value, needle):
    refused_config(set_config(donor_dir, **{key: value}), f"{key} is {value}", needle, "[64, 32]")


@pytest.mark.parametrize("key, value", [
    ("num_hidden_layers", "two"), ("num_hidden_layers", 2.0), ("num_hidden_layers", True),
    ("num_experts", -4), ("hidden_size", [32]), ("model_type", 7), ("architectures", "OlmoeForCausalLM"),
    ("tie_word_embeddings", "false"),
])
def test_field_of_wrong_type(donor_dir, key, value):
    refused_config(set_config(donor_dir, **{key: value}), f"field {key} is {json.dumps(value)}")


def test_non_integer_field_on_the_command_line(donor_dir, capsys):
    set_config(donor_dir, num_hidden_layers="two")
    assert main(["inspect", str(donor_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'field num_hidden_layers is "two"' in err[0], err


def test_deepseek_multi_token_prediction_layers_are_allowed(tmp_path):
    d = make_donor(tmp_path / "ds", "deepseek_v3", seed=0)  # 3 layers
    set_config(d, num_hidden_layers=2, num_nextn_predict_layers=1)
    anatomy = open_donor(d).anatomy
    assert anatomy.num_layers == 3 and anatomy.extra_layers == (2,)  # the MTP layer is a layer of its own
    set_config(d, num_nextn_predict_layers=0)
    refused_config(d, "num_hidden_layers is 2", "layers 0-2")


def test_a_fifo_named_like_a_shard_is_refused_not_waited_on(tmp_path):
    import os

    from surgeon.io.safetensors_file import read_header

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(SurgeonError, match="not a regular file"):
        read_header(str(fifo))


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/hostname", "sub/../../outside.safetensors"])
def test_an_index_cannot_point_outside_the_donor(tmp_path, target):
    """An index whose weight_map names a file outside the donor directory is refused before that file
    is opened: nothing of it (not even 8 bytes read as a header length) reaches the error."""
    d = make_donor(tmp_path / "d", "olmoe", seed=0)
    (tmp_path / "outside.safetensors").write_bytes(b"secret!!" * 4)
    tensors = list(read_header(str(d / "model.safetensors")).tensors)
    index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in tensors}}
    index["weight_map"][tensors[0]] = target
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SurgeonError) as e:
        open_donor(d)
    message = str(e.value)
    assert len(message.splitlines()) == 1 and "not a file inside" in message and "secret" not in message


def test_a_shard_that_is_a_symlink_still_opens(tmp_path):
    """A Hugging Face cache snapshot holds its shards as symlinks into ../../blobs: that stays allowed."""
    d = make_donor(tmp_path / "blobs-src", "olmoe", seed=0)
    snap = tmp_path / "snapshots" / "rev"
    snap.mkdir(parents=True)
    for f in d.iterdir():
        (snap / f.name).symlink_to(f)
    assert open_donor(snap).tensors
