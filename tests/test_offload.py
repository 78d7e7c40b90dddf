"""A hybrid larger than its devices (--device auto, accelerate offloading layers to disk) swaps and
probes exactly like the same hybrid held whole in memory."""

import hashlib
import json

import pytest
import torch
from transformers import AutoTokenizer

from surgeon.core.donor import open_donor
from surgeon.core.plan import Plan, parse_spec
from surgeon.errors import SurgeonError
from surgeon.live.hybrid import Hybrid
from surgeon.live.loader import parse_max_memory
from surgeon.probes import parse_probe
from surgeon.probes.run import evaluate, load_probe_data

DEMO = {"A": "demo:base", "B": "demo:arith", "C": "demo:reverse"}
# Less than the demo base's ~1 MB: accelerate keeps the embedding in CPU memory and offloads the
# rest to disk, the path a 7B model takes on a machine smaller than it.
SMALL = {"cpu": 300_000}


def demo_donors():
    return {name: open_donor(spec) for name, spec in DEMO.items()}


def digest(donors) -> dict:
    return {str(f): hashlib.sha256(open(f, "rb").read()).hexdigest()
            for d in donors.values() for f in {t.file for t in d.tensors.values()}}


def outcomes(hybrid, tok, specs):
    out = []
    for spec in specs:
        res = evaluate(hybrid.model, tok, spec, load_probe_data(spec), batch_size=4)
        out.append((res.ids, res.outcomes, res.extra.get("acc_norm")))
    return out


def test_offloaded_hybrid_swaps_and_probes_like_the_unsplit_one():
    donors = demo_donors()
    before = digest(donors)
    split = Hybrid.materialize(Plan("A"), donors, device="auto", max_memory=SMALL)
    whole = Hybrid.materialize(Plan("A"), donors, device="cpu")
    assert len(split.offloaded) > 30  # every layer is on disk, not only the lm_head
    assert any(p.device.type == "meta" for p in split.model.parameters())
    tok = AutoTokenizer.from_pretrained(donors["A"].path)
    specs = [parse_probe("mc:arith_mc,limit=12"), parse_probe("mc:reverse_mc,limit=12"),
             parse_probe("em:arith,limit=6")]
    ids = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(3))

    plans = [Plan("A"), Plan("A", [parse_spec("attention", "B"), parse_spec("experts@0-1", "C")]),
             Plan("A", [parse_spec("experts", "B"), parse_spec("lm_head", "C")]), Plan("A")]
    seen = set()
    for plan in plans:
        a, b = split.apply(plan), whole.apply(plan)
        assert (a.tensors, a.bytes) == (b.tensors, b.bytes)
        for name in split.resolution.sources:
            assert torch.equal(split.live_view(name), whole.live_view(name)), name
        with torch.no_grad():
            assert torch.equal(split.model(ids).logits, whole.model(ids).logits)
        got = outcomes(split, tok, specs)
        assert got == outcomes(whole, tok, specs)
        seen.add(json.dumps(got))
    assert len(seen) > 1  # the swaps changed what the probes answer, so the comparison means something
    assert digest(donors) == before  # swaps wrote the hybrid's own offload files, never a donor


def test_cli_probe_with_device_auto_offloaded_records_the_unsplit_outcomes(tmp_path, run_cli):
    session = tmp_path / "s.json"
    r = run_cli("export", tmp_path / "out", "--base", "demo:base", "--take", "attention=demo:arith",
                "--save-session", session)
    assert r.returncode == 0, r.stderr
    rows = {}
    for device, env in (("cpu", {}), ("auto", {"MOE_SURGEON_MAX_MEMORY": "cpu=300000"})):
        r = run_cli("probe", session, "--probe", "mc:arith_mc,limit=10", "--device", device, "--json",
                    env={"MOE_SURGEON_CACHE": str(tmp_path / f"cache-{device}"), **env})
        assert r.returncode == 0, r.stderr
        rows[device] = [(x["model"], x["score"]) for x in json.loads(r.stdout)["results"]]
    assert rows["auto"] == rows["cpu"]
    saved = json.loads(session.read_text())
    hybrid = [x["outcomes"] for x in saved["results"] if x["model"] == "hybrid"]
    assert len(hybrid) == 2 and hybrid[0] == hybrid[1]


@pytest.mark.parametrize("text", ["cpu", "cpu=", "=1GB", "0=1GB,,cpu=2GB"])
def test_bad_max_memory_is_one_line(text):
    with pytest.raises(SurgeonError, match="MOE_SURGEON_MAX_MEMORY"):
        parse_max_memory(text)


def test_max_memory_parses_devices_and_sizes():
    assert parse_max_memory("0=20GiB, cpu=60GiB") == {0: "20GiB", "cpu": "60GiB"}
    assert parse_max_memory("cpu=300000") == {"cpu": 300000}
    assert parse_max_memory("") is None
