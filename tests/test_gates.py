"""Self-MoE layer gates (Self-MoE): forms, zero init, training, selection (eq. 3-5), the sidecar,
its loader, and gates as a transplantable component (plan, export, hybrid, grid, CLI)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_models import make_donor, save_char_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgeon.core.donor import open_donor
from surgeon.core.gates_sidecar import (
    GATES_FILE,
    gate_tensor_name,
    read_gates,
    write_gates,
)
from surgeon.core.plan import Assignment, Plan, parse_spec
from surgeon.core.resolve import resolve
from surgeon.core.workbench import Cell, Workbench
from surgeon.errors import SurgeonError
from surgeon.features.export import export_hybrid
from surgeon.features.gates.select import select_gates
from surgeon.features.gates.train import (
    TrainSettings,
    load_data,
    text_data,
    train_gates,
)
from surgeon.live.hybrid import Hybrid
from surgeon.live.layer_gates import (
    add_zero_gates,
    attach_gate,
    decoder_layers,
    gate_modules,
    gate_state,
)
from surgeon.live.loader import load_gated

torch.set_num_threads(1)
TEXT = "".join(f"the cat sat on mat {i} and {i}+{2 * i % 7}={i + 2 * i % 7} rev:ab{chr(97 + i % 26)}=\n" for i in range(24))


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """Two tiny 3-layer llama donors (seeds 0 and 1) with a character tokenizer."""
    root = tmp_path_factory.mktemp("gated")
    return [save_char_tokenizer(make_donor(root / f"d{i}", "llama", seed=i, num_hidden_layers=3)) for i in range(2)]


def _model(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _ids(vocab=40, seed=0):
    return torch.randint(3, vocab, (2, 17), generator=torch.Generator().manual_seed(seed))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[t.dtype])


def _gated_dir(src, out, gates: dict, hidden: int):
    """A gated checkpoint the way `gates add` makes one: a byte copy of `src` plus the sidecar."""
    donors = {"A": open_donor(src)}
    export_hybrid(resolve(Plan("A"), donors), donors, out, before_rename=lambda tmp: write_gates(tmp, gates, hidden))
    return out


# ---------------------------------------------------------------- gates on a live model
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_gates_leave_logits_bit_identical_and_a_trained_gate_changes_them(llama3, dtype):
    model = _model(llama3[0], dtype)
    ids = _ids()
    with torch.no_grad():
        plain = model(ids).logits
        for kind, layers in (("scalar", [0]), ("vector", [1]), ("matrix", [2])):
            add_zero_gates(model, kind, layers)
        gated = model(ids).logits
        assert set(gate_modules(model)) == {0, 1, 2}
        assert torch.equal(_bits(plain), _bits(gated))  # bit for bit, signed zeros included
        gate_modules(model)[1].weight.fill_(0.25)
        assert not torch.equal(model(ids).logits, plain)


def test_gate_forms_add_g_of_the_layer_input_to_its_output(llama3):
    """h_L = B_L(h_{L-1}) + G_L(h_{L-1}): scalar w*h, vector w⊙h, matrix h W^T (W [out, in])."""
    model = _model(llama3[0])
    hidden = model.config.hidden_size
    ids = _ids()
    seen = {}
    decoder_layers(model)[1].register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("in", a[0] if a else kw["hidden_states"]), with_kwargs=True)
    torch.manual_seed(3)
    weights = {"scalar": torch.tensor([0.7]), "vector": torch.randn(hidden), "matrix": torch.randn(hidden, hidden) * 0.1}
    for kind, w in weights.items():
        gate = attach_gate(model, 1, tuple(w.shape))
        # registered after the gate's hook, so it sees the gated output
        out_hook = decoder_layers(model)[1].register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
        with torch.no_grad():
            model(ids)
            without = seen["out"].clone()
            gate.weight.copy_(w)
            model(ids)
            h = seen["in"]
            expected = h @ w.T if kind == "matrix" else h * w
            torch.testing.assert_close(seen["out"] - without, expected, rtol=1e-5, atol=1e-5)
        out_hook.remove()


# ---------------------------------------------------------------- selection, eq. 3-5
def _independent_layer_ppls(model, ids, layer):
    """Eq. 3 and 4 computed apart from gates_select: the layer's output with every gate on (p_t2)
    and with only this layer's gate zeroed (p_t1), each through the final norm and lm_head."""
    outs = []
    hook = decoder_layers(model)[layer].register_forward_hook(lambda m, a, o: outs.append(o))
    gate = gate_modules(model)[layer]
    saved = gate.weight.detach().clone()
    with torch.no_grad():
        model(ids[:, :-1])
        gate.weight.zero_()
        model(ids[:, :-1])
        gate.weight.copy_(saved)
    hook.remove()
    with_gate, without_gate = outs

    def ppl(h):
        logits = model.lm_head(model.model.norm(h)).float()
        return math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item())

    return ppl(without_gate), ppl(with_gate)


def test_selection_matches_an_independent_computation_of_eq_3_to_5(llama3):
    tok = AutoTokenizer.from_pretrained(llama3[0])
    model = _model(llama3[0])
    add_zero_gates(model, "vector", [0, 1, 2])
    data = text_data(tok, TEXT, 32, "stream")
    train_gates(model, data, TrainSettings(steps=25, lr=5e-2, warmup=2, batch_size=8, seq_len=32, seed=0))
    with torch.no_grad():
        gate_modules(model)[1].weight.fill_(-3.0)  # a gate that surely hurts
    sel = select_gates(model, data, batch_size=4)
    assert sel.tokens == data.ids[:, 1:].numel()
    for row in sel.layers:
        p1, p2 = _independent_layer_ppls(model, data.ids, row.layer)
        assert row.ppl_without == pytest.approx(p1, rel=1e-5)
        assert row.ppl_with == pytest.approx(p2, rel=1e-5)
        assert row.keep == (p2 < p1)  # eq. 5: keep the gates that lower the perplexity
    assert 1 in sel.dropped and sel.kept, sel.to_json()  # both verdicts occur
    # The last gated layer's "with gate" perplexity is the model's own.
    with torch.no_grad():
        logits = model(data.ids[:, :-1]).logits
    own = math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data.ids[:, 1:].reshape(-1)).item())
    assert sel.layers[-1].ppl_with == pytest.approx(own, rel=1e-5)
    assert select_gates(model, data, min_gain=0.99).kept == []


def test_another_min_gain_redoes_the_verdicts_of_the_same_measurements():
    """What the Gates screen's m shows: eq. 5 again on the measured perplexities, no rerun."""
    from surgeon.features.gates.select import LayerSelection, Selection, with_min_gain

    sel = Selection([LayerSelection(0, "vector", 10.0, 9.5, True), LayerSelection(1, "scalar", 10.0, 10.5, False)],
                    100, 0.0)
    strict = with_min_gain(sel, 0.1)  # 9.5 is not below 10 * 0.9: the minor gain is dropped too
    assert (strict.kept, strict.dropped, strict.tokens, strict.min_gain) == ([], [0, 1], 100, 0.1)
    assert [(r.ppl_without, r.ppl_with) for r in strict.layers] == [(10.0, 9.5), (10.0, 10.5)]
    assert with_min_gain(strict, 0.0).to_json() == sel.to_json()


# ---------------------------------------------------------------- training
def test_training_is_deterministic_touches_only_gates_and_lowers_held_out_ppl(llama3):
    tok = AutoTokenizer.from_pretrained(llama3[0])
    data = text_data(tok, TEXT, 24, "line")
    held_out = text_data(tok, "the cat ate the dog\nrev:xyz=zyx\n5+5=10\n", 24, "line")
    settings = TrainSettings(steps=15, lr=2e-2, warmup=3, batch_size=4, seq_len=24, seed=7)
    runs = []
    for seed in (7, 7, 8):
        model = _model(llama3[0])
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        add_zero_gates(model, "matrix", [1, 2])
        result = train_gates(model, data, TrainSettings(**{**settings.__dict__, "seed": seed}), held_out=held_out)
        assert len(result.losses) == 15
        for n, p in model.named_parameters():
            if "layer_gate" not in n:
                assert torch.equal(p, before[n]), n  # the model itself is frozen
            assert p.requires_grad  # and its flags are restored
        runs.append((gate_state(model), result))
    (a, ra), (b, rb), (c, _) = runs
    assert all(torch.equal(a[l], b[l]) for l in a) and ra.losses == rb.losses  # same seed, same gates
    assert not torch.equal(a[1], c[1])  # another seed, other batches
    assert ra.eval_after < ra.eval_before
    assert all(g.abs().sum() > 0 for g in a.values())


def test_pairs_score_only_the_answer_tokens():
    tok = AutoTokenizer.from_pretrained(str(open_donor("demo:arith").path))
    data = load_data(tok, "arith", 64)  # the built-in probe set, prompt/answer pairs
    first = json.loads(open_donor("demo:arith").path.parent.parent.joinpath("probes/arith.jsonl").read_text().splitlines()[0])
    ids = data.ids[0][: len(first["prompt"]) + len(first["answer"]) + 1].tolist()
    assert tok.decode(ids[: len(first["prompt"])]) == first["prompt"]
    scored = data.ids[0, 1:][data.valid[0]].tolist()
    assert tok.decode(scored[:-1]) == first["answer"] and scored[-1] == tok.eos_token_id


# ---------------------------------------------------------------- sidecar and loader
def test_round_trip_export_with_gates_load_gated_gives_the_live_logits(llama3, tmp_path):
    live = _model(llama3[0])
    add_zero_gates(live, "vector", [0, 2])
    torch.manual_seed(0)
    with torch.no_grad():
        for g in gate_modules(live).values():
            g.weight.normal_(0, 0.5)
    out = _gated_dir(llama3[0], tmp_path / "gated", gate_state(live), live.config.hidden_size)
    loaded = load_gated(out, device="cpu")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, live(ids).logits)
        plain = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits  # ignores the sidecar
        assert torch.equal(plain, _model(llama3[0])(ids).logits)
        assert not torch.equal(plain, live(ids).logits)
    gates, meta = read_gates(out)
    assert sorted(gates) == [0, 2] and meta["gate_type"] == "vector" and meta["format_version"] == "1"
    assert sorted(load_file(str(out / GATES_FILE))) == [gate_tensor_name(0), gate_tensor_name(2)]


def test_a_donor_sees_the_sidecar_as_layer_gate_parts_and_fingerprints_it(llama3, tmp_path):
    out = _gated_dir(llama3[0], tmp_path / "g", {1: torch.zeros(1)}, 32)
    donor = open_donor(out)
    assert donor.anatomy.tensors_of("layer_gate") == [gate_tensor_name(1)]
    assert not donor.anatomy.unclassified
    before = donor.fingerprint
    other = _gated_dir(llama3[0], tmp_path / "g2", {1: torch.ones(1)}, 32)  # only the gate's values differ
    assert open_donor(other).fingerprint != before
    assert open_donor(llama3[0]).anatomy.tensors_of("layer_gate") == []
    save_file({"model.layers.1.mlp.gate_proj.weight": torch.zeros(2)}, str(out / GATES_FILE),
              metadata={"format": "moe-surgeon-layer-gates", "format_version": "1"})
    with pytest.raises(SurgeonError, match="is not a layer gate"):
        open_donor(out)
    save_file({gate_tensor_name(1): torch.zeros(5)}, str(out / GATES_FILE),
              metadata={"format": "moe-surgeon-layer-gates", "format_version": "1"})
    with pytest.raises(SurgeonError, match=r"shape \[5\] is no layer gate for hidden_size 32"):
        open_donor(out)


# ---------------------------------------------------------------- gates as a component
def test_gates_transplant_into_a_gateless_base_by_plan_export_and_hybrid(llama3, tmp_path):
    torch.manual_seed(1)
    gates = {1: torch.randn(32) * 0.5, 2: torch.randn(32, 32) * 0.05}
    gated = _gated_dir(llama3[0], tmp_path / "gated", gates, 32)
    donors = {"A": open_donor(llama3[1]), "G": open_donor(gated)}
    plan = Plan("A", [parse_spec("layer_gate@1-2", "G")])
    resolution = resolve(plan, donors)
    assert sorted(resolution.gate_names()) == [gate_tensor_name(1), gate_tensor_name(2)]
    out = tmp_path / "hybrid"
    export_hybrid(resolution, donors, out)
    assert "Plain transformers ignores the gates" in (out / "README.md").read_text()
    assert set(load_file(str(out / "model.safetensors"))) == set(load_file(str(llama3[1] / "model.safetensors")))
    # Reference built apart: donor A's model with G's gates attached by hand.
    ref = _model(llama3[1])
    with torch.no_grad():
        for layer, w in gates.items():
            attach_gate(ref, layer, tuple(w.shape)).weight.copy_(w)
    ids = _ids()
    hybrid = Hybrid.materialize(plan, donors, device="cpu", dtype="float32")
    with torch.no_grad():
        want = ref(ids).logits
        assert torch.equal(load_gated(out, device="cpu")(ids).logits, want)
        assert torch.equal(hybrid.model(ids).logits, want)  # probes see the gates
        # Hot-swap: dropping the gates from the plan detaches them; taking layer 2 alone re-attaches it.
        hybrid.apply(Plan("A"))
        assert gate_modules(hybrid.model) == {}
        assert torch.equal(hybrid.model(ids).logits, _model(llama3[1])(ids).logits)
        hybrid.apply(Plan("A", [parse_spec("layer_gate@2", "G")]))
        assert list(gate_modules(hybrid.model)) == [2]
        assert torch.equal(gate_modules(hybrid.model)[2].weight, gates[2])


def test_a_gateless_donor_removes_a_gated_base_gates_and_nothing_from_nobody_is_refused(llama3, tmp_path):
    gated = _gated_dir(llama3[0], tmp_path / "gated", {0: torch.ones(1), 2: torch.ones(1)}, 32)
    donors = {"G": open_donor(gated), "B": open_donor(llama3[1])}
    r = resolve(Plan("G", [Assignment("layer_gate", "B", (0,))]), donors)
    assert r.gate_names() == [gate_tensor_name(2)]
    with pytest.raises(SurgeonError, match="has layer gates in those layers"):
        resolve(Plan("B", [Assignment("layer_gate", "C", (0,))]), {"B": donors["B"], "C": open_donor(llama3[0])})


def test_the_grid_has_a_layer_gate_column_a_gated_donor_fills(llama3, tmp_path):
    gated = _gated_dir(llama3[0], tmp_path / "gated", {1: torch.ones(1) * 0.5, 2: torch.zeros(1)}, 32)
    wb = Workbench({"A": open_donor(llama3[1])}, "A")
    assert "layer_gate" not in wb.columns
    wb.add_donor(open_donor(gated))  # B
    assert "layer_gate" in wb.columns and len(wb.column_cells("layer_gate")) == 2
    assert wb.set_cells(wb.column_cells("layer_gate"), "B")
    plan = wb.plan()
    assert [a.spec for a in plan.assignments] == ["layer_gate@1-2"]
    assert sorted(resolve(plan, wb.donors).gate_names()) == [gate_tensor_name(1), gate_tensor_name(2)]
    wb.undo()
    assert wb.plan().assignments == []
    wb.add_donor(open_donor(llama3[0]))  # C: no gates
    with pytest.raises(SurgeonError, match="neither donor C nor the base"):
        wb.set_cells([Cell(1, "layer_gate")], "C")


# ---------------------------------------------------------------- CLI
def test_cli_add_train_select_show_and_transplant(run_cli, llama3, tmp_path):
    out = tmp_path / "g"
    r = run_cli("gates", "add", out, "--base", llama3[0], "--type", "matrix", "--layers", "1-2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["gates"] == {"1": "matrix", "2": "matrix"}
    assert "Plain transformers ignores the gates" in (out / "README.md").read_text()
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    r = run_cli("gates", "train", out, "--data", text, "--eval", text, "--steps", "6", "--seq-len", "24",
            "--batch-size", "4", "--lr", "0.02", "--warmup", "1", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    log = json.loads(r.stdout)
    assert len(log["losses"]) == 6 and log["eval_ppl_after"] < log["eval_ppl_before"]
    assert json.loads((out / "layer_gates_training.json").read_text())["losses"] == log["losses"]
    trained, meta = read_gates(out)
    assert all(w.abs().sum() > 0 for w in trained.values()) and "training" in meta
    r = run_cli("gates", "select", out, "--data", text, "--seq-len", "24", "--device", "cpu", "--min-gain", "0.999", "--json")
    assert r.returncode == 0, r.stderr
    sel = json.loads(r.stdout)
    assert sel["dropped"] == [1, 2] and not (out / GATES_FILE).exists()  # no gate gains 99.9%
    # Transplant through the ordinary export: gates of a gated checkpoint into another model.
    gated = _gated_dir(llama3[0], tmp_path / "g2", trained, 32)
    r = run_cli("export", tmp_path / "x", "--base", llama3[1], "--take", f"layer_gate@2={gated}",
            "--save-session", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    assert list(load_file(str(tmp_path / "x" / GATES_FILE))) == [gate_tensor_name(2)]
    r = run_cli("replay", tmp_path / "s.json", "--export", tmp_path / "y")
    assert r.returncode == 0, r.stderr
    assert torch.equal(load_file(str(tmp_path / "y" / GATES_FILE))[gate_tensor_name(2)], trained[2])
    r = run_cli("gates", "show", gated)
    assert r.returncode == 0 and "matrix" in r.stdout, r.stderr


@pytest.mark.parametrize("args, message", [
    (["add", "{out}", "--base", "{d0}", "--type", "vector", "--layers", "5"], "layer 5 out of range"),
    (["add", "{out}", "--base", "{gated}", "--type", "scalar", "--layers", "0-1"], "layer 1 already has a scalar gate"),
    (["train", "{d0}", "--data", "{d0}/config.json"], "has no layer_gates.safetensors"),
    (["select", "{gated}", "--data", "{missing}"], "no such file"),
])
def test_cli_bad_input_is_one_line_naming_the_problem(run_cli, llama3, tmp_path, args, message):
    gated = _gated_dir(llama3[0], tmp_path / "gated", {1: torch.zeros(1)}, 32)
    fill = {"out": tmp_path / "out", "d0": llama3[0], "gated": gated, "missing": tmp_path / "nope.txt"}
    r = run_cli("gates", *[a.format(**fill) for a in args])
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
