"""Export details: shards and index, dtype casts, tied embeddings, atomicity, provenance."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_donor
from transformers import AutoModelForCausalLM

from surgeon.core.donor import open_donor
from surgeon.core.plan import Plan, parse_spec
from surgeon.core.resolve import resolve
from surgeon.errors import SurgeonError
from surgeon.features.export import ExportRequest, export_hybrid, run_export
from surgeon.jobs import Cancelled, CancelToken


def load_all(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_sharded_export_with_index_loads_in_transformers(donors_of, tmp_path, cli):
    a, b = donors_of("mixtral", 2)
    out = tmp_path / "out"
    r = cli("export", out, "--base", a, "--take", f"experts={b}", "--max-shard-size", "30KB", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["shards"] > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
    assert index["metadata"]["total_size"] == info["bytes"]
    got = load_all(out)
    want_b = load_all(b)
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    assert torch.equal(got[name], want_b[name])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "mixtral"
    for f in ("config.json", "generation_config.json", "README.md", "moe-surgeon-session.json"):
        assert (out / f).is_file(), f


def test_dtype_cast_keeps_router_bias_in_fp32(donors_of, tmp_path, cli):
    a, b = donors_of("deepseek_v3", 2)
    out = tmp_path / "bf16"
    r = cli("export", out, "--base", a, "--take", f"router={b}", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    got = load_all(out)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert got[bias].dtype == torch.float32 and torch.equal(got[bias], load_all(b)[bias])
    w = "model.layers.1.mlp.gate.weight"
    assert got[w].dtype == torch.bfloat16 and torch.equal(got[w], load_all(b)[w].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    AutoModelForCausalLM.from_pretrained(out)


def test_bf16_donors_stay_bf16(tmp_path, cli):
    a = make_donor(tmp_path / "a", "qwen3_moe", seed=0, dtype=torch.bfloat16)
    b = make_donor(tmp_path / "b", "qwen3_moe", seed=1, dtype=torch.bfloat16)
    out = tmp_path / "out"
    assert cli("export", out, "--base", a, "--take", f"experts@1={b}").returncode == 0
    assert {t.dtype for t in load_all(out).values()} == {torch.bfloat16}


def test_tied_embeddings(tmp_path, cli):
    a = make_donor(tmp_path / "a", "qwen2", seed=0, tie_word_embeddings=True)
    b = make_donor(tmp_path / "b", "qwen2", seed=1, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_all(a)
    r = cli("export", tmp_path / "x", "--base", a, "--take", f"lm_head={b}")
    assert r.returncode == 2 and "take embedding instead" in r.stderr
    out = tmp_path / "out"
    assert cli("export", out, "--base", a, "--take", f"embedding={b}").returncode == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    emb = load_all(b)["model.embed_tokens.weight"]
    assert torch.equal(model.lm_head.weight, emb) and torch.equal(model.model.embed_tokens.weight, emb)


def test_untied_base_takes_lm_head_from_tied_donor(tmp_path, cli):
    a = make_donor(tmp_path / "a", "llama", seed=0)
    b = make_donor(tmp_path / "b", "llama", seed=1, tie_word_embeddings=True)
    out = tmp_path / "out"
    assert cli("export", out, "--base", a, "--take", f"lm_head={b}").returncode == 0
    assert torch.equal(load_all(out)["lm_head.weight"], load_all(b)["model.embed_tokens.weight"])


def resolved(a, b, spec="experts"):
    donors = {"A": open_donor(a), "B": open_donor(b)}
    return resolve(Plan("A", [parse_spec(spec, "B")]), donors), donors


def test_cancelled_export_leaves_nothing(donors_of, tmp_path):
    """A token cancelled from the progress callback, as the workbench's cancel key or ctrl+c does
    while bytes flow: the export stops before the next tensor and removes its staging directory."""
    a, b = donors_of("olmoe", 2)
    donors = {"A": open_donor(a), "B": open_donor(b)}
    token = CancelToken()
    steps = []

    def progress(step):
        steps.append(step)
        if len(steps) == 10:
            token.cancel()

    request = ExportRequest(Plan("A", [parse_spec("experts", "B")]), donors, tmp_path / "out", max_shard_size=20_000)
    with pytest.raises(Cancelled):
        run_export(request, progress=progress, cancel=token)
    assert len(steps) == 10 and steps[-1].unit == "bytes" and 0 < steps[-1].done < steps[-1].total
    assert os.listdir(tmp_path) == []


def test_failure_midway_leaves_nothing(donors_of, tmp_path):
    a, b = donors_of("olmoe", 2)
    res, donors = resolved(a, b)

    def explode(step):
        if step.done > step.total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_hybrid(res, donors, tmp_path / "out", progress=explode)
    assert os.listdir(tmp_path) == []


def test_killed_export_is_cleaned_by_the_next(donors_of, tmp_path, cli):
    a, b = donors_of("olmoe", 2)
    stale = tmp_path / ".out.moe-surgeon-tmp-999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert cli("export", tmp_path / "out", "--base", a, "--take", f"experts={b}").returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_force_replaces_an_export_of_ours(donors_of, tmp_path, cli):
    a, b = donors_of("olmoe", 2)
    out = tmp_path / "out"
    assert cli("export", out, "--base", a).returncode == 0
    (out / "old.txt").write_text("old")
    assert cli("export", out, "--base", a, "--take", f"attention@0={b}", "--force").returncode == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_force_never_replaces_a_directory_we_did_not_write(donors_of, tmp_path, cli):
    """`export DIR --force` onto an ordinary directory used to delete its files; now it refuses."""
    a, _ = donors_of("olmoe", 2)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    r = cli("export", out, "--base", a, "--force")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "not a checkpoint moe-surgeon wrote" in r.stderr
    assert (out / "thesis.tex").read_text() == "years of work" and sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert sorted(os.listdir(tmp_path)) == ["mine"]  # no staging directory left either


def test_model_card_and_embedded_session(donors_of, tmp_path, cli):
    a, b, c = donors_of("olmoe", 3)[:3]
    out = tmp_path / "out"
    r = cli("export", out, "--base", a, "--take", f"attention={b}", "--take", f"expert:1-2@0={c}")
    assert r.returncode == 0, r.stderr
    card = (out / "README.md").read_text()
    for d in (a, b, c):
        assert str(d) in card and open_donor(d).fingerprint in card
    assert "`attention` from donor B" in card and "`expert:1-2@0` from donor C" in card
    session = json.loads((out / "moe-surgeon-session.json").read_text())
    assert [p["component"] for p in session["plan"]] == ["attention", "expert"]
    assert session["plan"][1] == {"component": "expert", "donor": "C", "layers": [0], "experts": [1, 2]}


def test_resolution_shares_and_changed(donors_of):
    a, b = donors_of("olmoe", 2)
    res, donors = resolved(a, b, "attention@1")
    changed = res.changed()
    assert changed and all(".layers.1.self_attn." in n for n in changed)
    shares = res.parameters_by_donor()
    assert shares["B"] == sum(donors["B"].tensors[n].numel for n in changed)


def test_same_donor_twice_is_one_donor(donors_of, tmp_path, cli):
    a, b = donors_of("olmoe", 2)
    out = tmp_path / "out"
    r = cli("export", out, "--base", a, "--take", f"router={b}", "--take", f"attention={b}", "--json")
    assert r.returncode == 0
    assert set(json.loads(r.stdout)["share_by_donor"]) == {"A", "B"}


def test_interrupt_with_sigint_leaves_nothing(tmp_path):
    """A real process interrupted by Ctrl-C mid-export leaves no output and no hidden leftovers."""
    a = make_donor(tmp_path / "a", "olmoe", seed=0, num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                   num_attention_heads=4, num_key_value_heads=4, num_experts=64)
    script = (
        "import sys,time; from surgeon.core.donor import open_donor; from surgeon.core.plan import Plan;"
        "from surgeon.core.resolve import resolve; from surgeon.features.export import export_hybrid;"
        f"d={{'A': open_donor({str(a)!r})}}; r=resolve(Plan('A'), d);"
        f"export_hybrid(r, d, {str(tmp_path / 'out')!r}, progress=lambda s: (print('go', flush=True), time.sleep(0.05)))"
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"go"
    p.send_signal(signal.SIGINT)
    p.wait(timeout=60)
    assert p.returncode != 0
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_resolve_refuses_unknown_donor_name(donors_of):
    a, _ = donors_of("olmoe", 2)
    with pytest.raises(SurgeonError, match="names donor 'Z'"):
        resolve(Plan("A", [parse_spec("router", "Z")]), {"A": open_donor(a)})


def test_a_directory_named_twice_on_the_command_line_is_one_donor_read_once(donors_of, monkeypatch):
    """`--take experts=B --take attention=B`: one donor B, its headers read once."""
    import surgeon.core.donor as donor_module

    a, b = donors_of("olmoe", 2)
    opened = []
    real = donor_module.open_donor

    def counting(path, **kwargs):
        opened.append(path)
        return real(path, **kwargs)

    monkeypatch.setattr(donor_module, "open_donor", counting)
    by_path = donor_module.DonorsByPath()
    names = [by_path.name_for(str(p)) for p in (a, b, b, f"{b}/", a)]
    assert names == ["A", "B", "B", "B", "A"] and list(by_path.donors) == ["A", "B"]
    assert len(opened) == 2
