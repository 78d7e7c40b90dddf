"""The example sessions in sessions/ replay: same fingerprints, same export, same probe results."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgeon.core.donor import DEMO_ROOT

SESSIONS = Path(__file__).resolve().parent.parent / "sessions"


@pytest.mark.parametrize("session", sorted(SESSIONS.glob("*.json")), ids=lambda p: p.name)
def test_example_session_replays_to_an_export(session, tmp_path, cli):
    out = tmp_path / "out"
    r = cli("replay", session, "--export", out)
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_demo_transfer_session_takes_early_experts_from_reverse(tmp_path, cli):
    out = tmp_path / "out"
    assert cli("replay", SESSIONS / "demo-transfer.json", "--export", out).returncode == 0
    got = load_file(out / "model.safetensors")
    arith = load_file(DEMO_ROOT / "arith" / "model.safetensors")
    reverse = load_file(DEMO_ROOT / "reverse" / "model.safetensors")
    for name, t in got.items():
        from_reverse = ".mlp.experts." in name and (".layers.0." in name or ".layers.1." in name)
        assert torch.equal(t, (reverse if from_reverse else arith)[name]), name


def test_demo_transfer_probes_replay_item_for_item(cli):
    r = cli("replay", SESSIONS / "demo-transfer.json", "--probes", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 per-item difference(s)" in r.stdout


def test_demo_command_copies_the_donors(tmp_path, cli):
    r = cli("demo", tmp_path / "demo")
    assert r.returncode == 0, r.stderr
    names = [line.split("\t")[0] for line in r.stdout.splitlines()]
    assert names == ["arith", "base", "dense-arith", "dense-base", "dense-reverse", "reverse"]
    r = cli("inspect", tmp_path / "demo" / "arith", "--json")
    assert r.returncode == 0 and '"model_type": "olmoe"' in r.stdout
