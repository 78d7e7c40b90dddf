"""Mixing dense donors into an MoE from the workbench (M), driven through the real app with Pilot.

On the shipped dense demo donors (three tiny llamas that differ only in their MLPs). The oracles:
the export's experts are the dense donors' MLP bytes, plain transformers loads it, `moe-surgeon
replay` of the saved session (a subprocess) writes identical bytes, and the loss curve the screen
showed is the one the export records.
"""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from test_tui_helpers import notifications, save_as, screen_text, settle, sync
from textual.widgets import Input, SelectionList, Sparkline

from screens.app import DEMO_SPECS, SurgeonApp
from screens.layer import LayerScreen
from screens.mix import MixScreen, MixSource, read_form
from screens.mix_state import DEMO_MIX
from screens.probes import ProbesScreen
from screens.surgery import SurgeryScreen
from surgeon.core.donor import open_donor
from surgeon.features.mix.workbench import dense_problem
from surgeon.probes import parse_probe
from surgeon.probes.run import evaluate, load_probe_data
from surgeon.probes.scoring import load_tokenizer

SIZE = (100, 30)
DENSE = ["demo:dense-base", "demo:dense-arith", "demo:dense-reverse"]
MIXTRAL = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
PROBE = "em:arith,limit=6"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tests share two CPU cores: an oversubscribed torch thread pool trains many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_app(tmp_path, specs=None, session=None):
    return SurgeonApp(specs, session, state_dir=tmp_path / "state", offer_recovery=False)


async def open_form(pilot) -> MixScreen:
    await pilot.press("M")
    await settle(pilot)
    assert isinstance(pilot.app.screen, MixScreen), notifications(pilot.app)
    return pilot.app.screen


def fill(screen: MixScreen, **values) -> None:
    for key, value in values.items():
        screen.query_one(f"#mix-{key}", Input).value = str(value)


async def build(pilot) -> None:
    await pilot.press("ctrl+b")
    await settle(pilot)


def raw(donor, name: str) -> bytes:
    info = donor.tensors[name]
    with open(info.file, "rb") as f:
        f.seek(info.start)
        return f.read(info.end - info.start)


def welcome(app) -> str:
    w = app.surgery.query_one("#welcome")
    return str(w.render()) if w.display else ""


# ---------------------------------------------------------------- the offer
@sync
async def test_mix_is_offered_only_when_every_donor_is_dense(tmp_path):
    app = make_app(tmp_path, DEMO_SPECS)  # the OLMoE demo: already MoEs
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert "M: mix" not in screen_text(app)
        await pilot.press("M")
        await settle(pilot)
        assert isinstance(app.screen, SurgeryScreen)
        assert any("mixing needs dense" in n and "donor A is olmoe" in n for n in notifications(app))

    donors = {n: open_donor(s) for n, s in zip("AB", ["demo:dense-base", "demo:arith"])}
    assert "donor B is olmoe" in dense_problem(donors)

    app = make_app(tmp_path, DENSE)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert "Dense llama donors are open. M: mix into an MoE" in welcome(app)
        screen = await open_form(pilot)
        values = screen.values()
        assert (values["base"], values["experts"], values["router"], values["always"]) == ("A", "B C", "uniform", "")
        assert Path(values["train"]).resolve() == DEMO_MIX / "train.jsonl"  # the demo's recipe
        assert (values["steps"], values["lr"], values["batch"]) == ("600", "0.02", "32")
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, SurgeryScreen)


# ---------------------------------------------------------------- a gate-less mix, end to end
@sync
async def test_gate_less_mix_from_the_form_is_the_donors_mlps_and_replays(tmp_path, cli):
    out = tmp_path / "mix"
    session = tmp_path / "mix-session.json"
    app = make_app(tmp_path, DENSE)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("j", "3")  # layer 1's attention from C: a component transfer of the mix
        await settle(pilot)
        screen = await open_form(pilot)
        assert "attention@1=C" in screen_text(app)
        fill(screen, train="", out=out)
        await build(pilot)
        assert isinstance(app.screen, SurgeryScreen)

        wb = app.wb
        assert list(wb.donors) == ["M", "A", "B", "C"] and wb.base == "M" and wb.marks == 0
        assert wb.donors["M"].path == out and wb.donors["M"].model_type == "mixtral"
        assert "expert 0 = B demo:dense-arith, expert 1 = C demo:dense-reverse" in welcome(app)
        grid = screen_text(app).replace("[", " ").replace("]", " ")  # the cursor's brackets
        rows = [line.split() for line in grid.splitlines() if re.match(r"\s+\d\s", line)]
        assert [r[:5] for r in rows] == [[str(layer), "M", "M", "B×1", "C×1"] for layer in range(4)]
        await pilot.press("l", "l", "enter")  # layer 1's experts in detail
        await settle(pilot)
        assert isinstance(app.screen, LayerScreen)
        text = screen_text(app).replace("[", " ").replace("]", " ")
        assert re.search(r"expert 0\s+B\b", text) and re.search(r"expert 1\s+C\b", text)
        await pilot.press("escape")
        await pilot.pause()

        await save_as(pilot, session)

        await pilot.press("p")  # the probes screen takes the mix as its hybrid, the dense donors as donors
        await settle(pilot)
        probes = app.screen
        assert isinstance(probes, ProbesScreen)
        title = str(probes.query_one("#probes-title").render())
        assert "hybrid: base M + 0 marked part(s) · donors  M   A   B   C" in title
        await pilot.press("plus")
        probes.query_one("#probe-add", Input).value = PROBE
        await pilot.press("enter")
        picker = probes.query_one(SelectionList)
        picker.deselect_all()
        picker.select(len(probes.specs) - 1)
        await pilot.press("r")
        await settle(pilot)
        records = {r["model"]: r for r in app.records.results}
        assert set(records) == {"hybrid", "donor:M", "donor:A", "donor:B", "donor:C"}, notifications(app)

    # What was written: a Mixtral whose experts are the dense donors' MLPs, byte for byte.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 2
    mix = open_donor(out)
    dense = {n: open_donor(s) for n, s in zip("ABC", DENSE)}
    for layer in range(4):
        for e, donor in enumerate("BC"):
            for proj, w in MIXTRAL.items():
                assert raw(mix, f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight") == \
                    raw(dense[donor], f"model.layers.{layer}.mlp.{proj}.weight")
        assert not any(raw(mix, f"model.layers.{layer}.block_sparse_moe.gate.weight"))  # gate-less: zeros
        attention = "C" if layer == 1 else "A"
        assert raw(mix, f"model.layers.{layer}.self_attn.q_proj.weight") == \
            raw(dense[attention], f"model.layers.{layer}.self_attn.q_proj.weight")

    # Dense donors cannot be hot-swapped into the mix: each was probed on a model of its own.
    spec = parse_probe(PROBE)
    data = load_probe_data(spec)
    tokenizer = load_tokenizer(dense["A"].path)
    for name, path in [("M", out), ("B", dense["B"].path)]:
        alone = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
        got = evaluate(alone, tokenizer, spec, data, batch_size=16)
        assert records[f"donor:{name}"]["outcomes"] == got.outcomes
    assert records["hybrid"]["outcomes"] == records["donor:M"]["outcomes"]

    # The session is the mix's recipe, as `moe-surgeon mix --session` writes it, and replays.
    saved = json.loads(session.read_text())
    assert [d["path"] for d in saved["donors"]] == DENSE and saved["base"] == "A"
    assert saved["plan"] == [{"component": "attention", "donor": "C", "layers": [1]}]
    recipe = saved["extensions"]["mix"]
    assert recipe["experts"] == ["B", "C"] and recipe["router"] == {"mode": "uniform", "top_k": None}
    assert recipe["arch"] == "mixtral" and recipe["train"] is None
    assert saved["exports"][-1]["kind"] == "mix" and saved["exports"][-1]["path"] == str(out)
    r = cli("replay", session, "--export", tmp_path / "again", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["routers_match_recording"] is True
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()

    # Opening the saved session shows the mix again, with its experts as donors.
    app = make_app(tmp_path, session=str(session))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.wb.base == "M" and app.wb.donors["M"].path == out and app.mix is not None
        assert "B×1 C×1" in screen_text(app)
        assert app.session_json(str(session))["extensions"]["mix"] == recipe


# ---------------------------------------------------------------- router training
@sync
async def test_router_training_shows_its_loss_curve_and_can_be_cancelled(tmp_path):
    cache = Path(os.environ["MOE_SURGEON_CACHE"]) / "mixes"
    app = make_app(tmp_path, DENSE)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = await open_form(pilot)
        spark = screen.query_one("#mix-loss", Sparkline)

        fill(screen, steps=100000, batch=2, out=tmp_path / "never")  # long enough to cancel
        await pilot.press("ctrl+b")
        for _ in range(600):
            await pilot.pause(0.05)
            if screen.losses:
                break
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, MixScreen) and "cancelled" in str(screen.query_one("#mix-stats").render())
        assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never*"))

        fill(screen, steps=5, batch=8, out="")  # the default folder: named by the settings, in the cache
        await build(pilot)
        assert isinstance(app.screen, SurgeryScreen), str(screen.query_one("#mix-error").render())
        out = app.mix.export
        assert out.parent == cache and out.name.startswith("mix-")
        curve = [float(line.split(",")[1]) for line in (out / "router-training.csv").read_text().splitlines()[1:]]
        assert len(curve) == 5 and list(spark.data) == pytest.approx(curve, abs=1e-6)
        assert list(screen.losses) == pytest.approx(curve, abs=1e-6)
        assert "routers trained 5 steps" in welcome(app)
        recipe = app.session_json(None)["extensions"]["mix"]
        assert recipe["train"]["steps"] == 5 and recipe["train"]["losses"] == pytest.approx(curve, abs=1e-6)
        assert recipe["compute"]["threads"] == 1


# ---------------------------------------------------------------- bad input
def test_the_form_names_the_field_at_fault():
    donors = {n: open_donor(s) for n, s in zip("ABC", DENSE)}
    source = MixSource(donors, {}, "A", [])
    good = {"base": "A", "experts": "B C", "router": "uniform", "always": "", "arch": "auto", "seed": "0",
            "prompts": "", "train": str(DEMO_MIX / "train.jsonl"), "steps": "5", "lr": "0.01", "batch": "4",
            "template": "raw", "out": ""}
    plan, settings, out = read_form(good, source)
    assert plan.experts == ["B", "C"] and settings.train.steps == 5 and out is None
    for field, value, message in [
        ("steps", "x", "steps 'x': expected a whole number"),
        ("steps", "0", "steps 0: train for at least 1 step"),
        ("lr", "fast", "lr 'fast': expected a number"),
        ("batch", "0", "batch 0: at least 1"),
        ("experts", "B Z", "experts 'Z': not an open donor (A, B, C)"),
        ("experts", "", "experts: name at least one donor"),
        ("router", "sparse", "router 'sparse': one of uniform, noisy:K"),
        ("router", "hidden:2", "router hidden: give each expert's prompts"),
        ("train", "/nonexistent/train.jsonl", "train on /nonexistent/train.jsonl: no such file"),
        ("arch", "dense", "arch 'dense': one of auto, mixtral, qwen2_moe"),
    ]:
        with pytest.raises(Exception, match=re.escape(message)):
            read_form({**good, field: value}, source)


@sync
async def test_bad_input_shows_in_the_form_never_a_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n")
    app = make_app(tmp_path, DENSE)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = await open_form(pilot)
        fill(screen, steps="many")
        await build(pilot)
        assert "steps 'many': expected a whole number" in str(screen.query_one("#mix-error").render())
        fill(screen, steps=2, train=bad, out=tmp_path / "out")  # read by the worker: a bad file
        await build(pilot)
        assert isinstance(app.screen, MixScreen)
        assert "bad.jsonl" in str(screen.query_one("#mix-error").render())
        assert not (tmp_path / "out").exists()
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("l", "l", "2")  # layer 0's MLP from B: a mix's MLPs are its experts
        screen = await open_form(pilot)
        fill(screen, train="", out=tmp_path / "out")
        await build(pilot)
        assert "a mix's MLPs are its experts" in str(screen.query_one("#mix-error").render())
        assert app.wb.base == "A" and app.mix is None


# ---------------------------------------------------------------- sessions `moe-surgeon mix` wrote
@sync
async def test_a_cli_mix_session_opens_as_the_mix_and_a_missing_export_can_be_rebuilt(tmp_path, cli):
    import shutil

    session, out = tmp_path / "cli-session.json", tmp_path / "cli-mix"
    r = cli("mix", out, "--base", "demo:dense-base", "--expert", "demo:dense-arith", "--expert",
            "demo:dense-reverse", "--router", "noisy:2", "--seed", "3", "--session", session)
    assert r.returncode == 0, r.stderr
    recipe = json.loads(session.read_text())["extensions"]["mix"]

    app = make_app(tmp_path, session=str(session))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.wb.base == "M" and app.wb.donors["M"].path == out and list(app.wb.donors) == ["M", "A", "B", "C"]
        assert "router noisy:2, top-2" in welcome(app) and "B×1 C×1" in screen_text(app)
        assert app.session_json(str(session))["extensions"]["mix"] == recipe

    shutil.rmtree(out)
    app = make_app(tmp_path, session=str(session))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.wb.base == "A" and app.mix is None and "export is missing: press M" in welcome(app)
        assert app.session_json(str(session))["extensions"]["mix"] == recipe  # kept as it was
        screen = await open_form(pilot)
        values = screen.values()
        assert (values["experts"], values["router"], values["seed"], values["train"]) == ("B C", "noisy:2", "3", "")
        fill(screen, out=tmp_path / "rebuilt")
        await build(pilot)
        assert app.wb.base == "M" and app.mix.export == tmp_path / "rebuilt"
        assert app.mix.outcome.digest == recipe["routers_sha256"]  # the same routers, drawn again


@sync
async def test_an_unsaved_mix_survives_a_crash(tmp_path):
    import subprocess
    import sys

    from screens.dialogs import ConfirmScreen

    app = make_app(tmp_path, DENSE)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = await open_form(pilot)
        fill(screen, train="", router="random:1", out=tmp_path / "mix")
        await build(pilot)
        recipe = app.session_json(None)["extensions"]["mix"]
        own = app.recovery.path
        assert own.is_file()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)
    os.rename(own, own.with_name(f"recovery-{dead}.json"))  # the process "died" with the mix unsaved
    again = SurgeonApp(DENSE, state_dir=tmp_path / "state", offer_recovery=True)
    async with again.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert isinstance(again.screen, ConfirmScreen)
        await pilot.press("y")
        await settle(pilot)
        assert again.mix is not None and again.wb.base == "M" and again.wb.donors["M"].path == tmp_path / "mix"
        assert again.session_json(None)["extensions"]["mix"] == recipe and again.dirty
