"""Probes equal independent per-item references; the CLI records, compares and replays them."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgeon.probes import parse_probe
from surgeon.probes.run import evaluate, load_probe_data

ARC = [
    {"id": "q1", "question": "ab", "choices": {"text": ["cd", "ef", "gh"], "label": ["A", "B", "C"]}, "answerKey": "A"},
    {"id": "q2", "question": "1+2", "choices": {"text": ["3", "4"], "label": ["A", "B"]}, "answerKey": "B"},
    {"id": "q3", "question": "xyz", "choices": {"text": ["zyx", "x", "yy"], "label": ["A", "B", "C"]}, "answerKey": "C"},
    {"id": "q4", "question": "k", "choices": {"text": ["a", "bb"], "label": ["A", "B"]}, "answerKey": "A"},
    {"id": "q5", "question": "99", "choices": {"text": ["1", "2", "3"], "label": ["A", "B", "C"]}, "answerKey": "B"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(donors_of):
    path = donors_of("olmoe", 2)[0]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def plain_logprob(model, tok, context, continuation):
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(float(lp[len(ctx) + j - 1, t]) for j, t in enumerate(cont))


@pytest.mark.parametrize("shots", [0, 2])
def test_mc_accuracy_equals_plain_forward_reference(tiny, tmp_path, shots):
    model, tok = tiny
    data_file = write_jsonl(tmp_path / "arc.jsonl", ARC)
    spec = parse_probe(f"mc:{data_file},limit=3,shots={shots}")
    data = load_probe_data(spec)
    out = evaluate(model, tok, spec, data, batch_size=2)
    prefix = "".join(f"Question: {s.question}\nAnswer: {s.choices[s.answer]}\n\n" for s in data.shots)
    assert len(data.shots) == shots and not {s.id for s in data.shots} & {i.id for i in data.items}
    want_acc, want_norm = [], []
    for item in data.items:
        ctx = prefix + f"Question: {item.question}\nAnswer:"
        lls = [plain_logprob(model, tok, ctx, " " + c) for c in item.choices]
        norm = [ll / len((" " + c).encode()) for ll, c in zip(lls, item.choices)]
        want_acc.append(float(lls.index(max(lls)) == item.answer))
        want_norm.append(float(norm.index(max(norm)) == item.answer))
    assert out.outcomes == want_acc
    assert out.extra["acc_norm"] == want_norm
    assert out.ids == [i.id for i in data.items]


def test_exact_match_scores_the_models_own_greedy_answers_as_correct(tiny, tmp_path):
    model, tok = tiny
    prompts = ["ab", "1+2=", "xyz"]
    golds = []
    for p in prompts:  # the model's own greedy continuation, by an independent plain loop
        ids = tok(p, add_special_tokens=False)["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(3):
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        golds.append(tok.decode(new).split("\n")[0].strip() or "?")
    rows = [{"prompt": p, "answer": g} for p, g in zip(prompts, golds)] + [{"prompt": "k", "answer": "never-this"}]
    spec = parse_probe(f"em:{write_jsonl(tmp_path / 'em.jsonl', rows)},max_new_tokens=3,template=raw")
    out = evaluate(model, tok, spec, load_probe_data(spec))
    assert out.outcomes == [1.0 if g != "?" else 0.0 for g in golds] + [0.0]


def test_perplexity_equals_exp_mean_token_nll(tiny, tmp_path):
    model, tok = tiny
    text = tmp_path / "t.txt"
    text.write_text("abc def\n\n12+34=46")
    spec = parse_probe(f"ppl:{text}")
    out = evaluate(model, tok, spec, load_probe_data(spec))
    for value, para in zip(out.outcomes, ["abc def", "12+34=46"]):
        ids = [tok.bos_token_id] + tok(para, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]])).logits[0]
        assert value == pytest.approx(float(F.cross_entropy(logits, torch.tensor(ids[1:]))), rel=1e-5)


@pytest.fixture
def session(donors_of, tmp_path, run_cli):
    a, b = donors_of("olmoe", 2)
    s = tmp_path / "s.json"
    r = run_cli("export", tmp_path / "out", "--base", a, "--take", f"experts={b}", "--save-session", s)
    assert r.returncode == 0, r.stderr
    return s


def test_cli_probe_records_results_and_replay_reproduces_them(session, tmp_path, run_cli):
    arc = write_jsonl(tmp_path / "arc.jsonl", ARC)
    r = run_cli("probe", session, "--probe", f"mc:{arc}", "--probe", f"ppl:{arc}", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    assert "items/s" in r.stderr and "ETA" in r.stderr  # progress lines even when stderr is not a terminal
    rows = json.loads(r.stdout)["results"]
    models = [row["model"] for row in rows]
    assert models.count("hybrid") == 2 and "donor:A" in models and "donor:B" in models
    mc_row = next(row for row in rows if row["model"] == "hybrid" and row["probe"].startswith("mc:"))
    assert set(mc_row["vs"]) == {"donor:A", "donor:B"}
    assert {"delta", "mcnemar_p", "z_p"} <= set(mc_row["vs"]["donor:A"])
    assert mc_row["ci"][0] <= mc_row["score"] <= mc_row["ci"][1]

    saved = json.loads(session.read_text())
    assert len(saved["probes"]) == 2
    hybrid = [x for x in saved["results"] if x["model"] == "hybrid"]
    assert all(len(x["outcomes"]) == x["n"] == len(x["ids"]) for x in hybrid)
    assert {"torch", "transformers", "numpy"} <= set(hybrid[0]["versions"])

    r = run_cli("replay", session, "--probes", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 per-item difference(s)" in r.stdout

    # a tampered recording is caught item by item
    saved["results"][0]["outcomes"][0] = 1 - saved["results"][0]["outcomes"][0]
    session.write_text(json.dumps(saved))
    r = run_cli("replay", session, "--probes", "--device", "cpu", "--json")
    assert r.returncode == 1
    assert len(json.loads(r.stdout)["differences"]) == 1


def test_donor_scores_come_from_the_cache_the_second_time(session, tmp_path, run_cli):
    arc = write_jsonl(tmp_path / "arc.jsonl", ARC)
    run_cli("probe", session, "--probe", f"mc:{arc}", "--device", "cpu", "--no-save")
    r = run_cli("probe", session, "--probe", f"mc:{arc}", "--device", "cpu")
    assert r.returncode == 0
    donors = [x for x in json.loads(session.read_text())["results"] if x["model"].startswith("donor:")]
    assert donors and all(x["cached"] for x in donors)


def test_probe_list(run_cli):
    r = run_cli("probe", "--list")
    assert r.returncode == 0
    for name in ("mc", "em", "ppl", "kl", "arith", "reverse_mc"):
        assert name in r.stdout


@pytest.mark.parametrize("probe, needle", [
    ("bogus:arith", "unknown probe 'bogus'"),
    ("em:arith,limit=x", "limit must be an integer"),
    ("mc:arith", "needs multiple-choice items"),
])
def test_bad_probe_specs(session, run_cli, probe, needle):
    before = session.read_bytes()
    r = run_cli("probe", session, "--probe", probe, "--device", "cpu")
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert session.read_bytes() == before  # a failed probe run leaves the session intact


def test_probe_file_with_missing_field(session, tmp_path, run_cli):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": {"text": ["a"], "label": ["A"]}}])
    before = session.read_bytes()
    r = run_cli("probe", session, "--probe", f"mc:{bad},fmt=arc", "--device", "cpu")
    assert r.returncode == 2 and "answerKey" in r.stderr and str(bad) in r.stderr
    assert session.read_bytes() == before


def test_device_that_does_not_exist(session, run_cli):
    r = run_cli("probe", session, "--probe", "em:arith", "--device", "cuda:7")
    assert r.returncode == 2 and "cuda:7" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- the registry, progress and cancel
def test_each_kind_declares_what_callers_switch_on():
    import math
    from pathlib import Path

    from surgeon.probes import KINDS, metric_of

    declared = {n: (k.metric.name, k.metric.higher_is_better, k.metric.proportion, k.per_donor)
                for n, k in KINDS.items()}
    assert declared == {"mc": ("accuracy", True, True, False), "em": ("accuracy", True, True, False),
                        "ppl": ("perplexity", False, False, False), "kl": ("kl", False, False, True)}
    assert metric_of("nll").score(1.5) == math.exp(1.5) and metric_of("kl").score(0.25) == 0.25
    assert metric_of("made-up").higher_is_better  # a hand-edited session's metric still reads
    # No kind is special-cased outside its own module (its name is data there, nowhere else).
    root = Path(__file__).resolve().parents[1]
    own = {root / "surgeon/probes/divergence.py", root / "surgeon/probes/perplexity.py"}
    for path in [*(root / "surgeon").rglob("*.py"), *(root / "screens").rglob("*.py")]:
        if path not in own:
            text = path.read_text()
            assert not any(q in text for q in ('"kl"', "'kl'", '"nll"', "'nll'")), path


@pytest.fixture
def live(donors_of, tmp_path, monkeypatch):
    """A hybrid of two tiny donors, with a donor score cache of its own."""
    from surgeon.core.donor import open_donor
    from surgeon.core.plan import Plan, parse_spec
    from surgeon.live.hybrid import Hybrid

    monkeypatch.setenv("MOE_SURGEON_CACHE", str(tmp_path / "cache"))
    a, b = donors_of("olmoe", 2)
    donors = {"A": open_donor(a), "B": open_donor(b)}
    plan = Plan("A", [parse_spec("experts", "B")])
    return Hybrid.materialize(plan, donors, device="cpu"), plan


def test_run_probes_counts_items_over_the_whole_run(live, tmp_path):
    from surgeon.probes.run import run_probes

    hybrid, plan = live
    arc = write_jsonl(tmp_path / "arc.jsonl", ARC)
    specs = [parse_probe(f"mc:{arc}"), parse_probe(f"kl:{arc},limit=3")]
    steps = []
    records = run_probes(hybrid, plan, specs, device="cpu", batch_size=2, progress=steps.append)
    # mc: the hybrid and both donors, 5 items each; kl: the hybrid and both donors, 3 items each
    assert {s.total for s in steps} == {15 + 9} and steps[-1].done == 24
    assert [s.done for s in steps] == sorted(s.done for s in steps) and {s.unit for s in steps} == {"items"}
    assert [(r["model"], r.get("vs")) for r in records] == [
        ("hybrid", None), ("hybrid", "donor:A"), ("hybrid", "donor:B"), ("donor:A", None), ("donor:B", None)]
    assert [r["metric"] for r in records] == ["accuracy", "kl", "kl", "accuracy", "accuracy"]
    again = []
    run_probes(hybrid, plan, specs[:1], device="cpu", batch_size=2, progress=again.append)
    assert {s.total for s in again} == {5}  # the donors' scores come from the cache: no items to measure


def test_cancel_stops_run_probes_between_batches_and_puts_the_hybrid_back(live, tmp_path):
    from surgeon.core.plan import Plan
    from surgeon.jobs import Cancelled, CancelToken
    from surgeon.live.hybrid import Hybrid
    from surgeon.probes.run import cache_dir, run_probes

    hybrid, plan = live
    arc = write_jsonl(tmp_path / "arc.jsonl", ARC)
    token, seen = CancelToken(), []

    def progress(step):
        seen.append(step)
        if step.detail.startswith("donor A") and step.done > 5:  # the hybrid is swapped to donor A now
            token.cancel()

    with pytest.raises(Cancelled):
        run_probes(hybrid, plan, [parse_probe(f"mc:{arc}")], device="cpu", batch_size=2, progress=progress,
                   cancel=token)
    assert seen[-1].done < 10  # stopped within donor A's probe, at its next batch
    assert not cache_dir().exists() or not list(cache_dir().iterdir())  # no donor score was finished
    assert hybrid.resolution.plan == plan
    fresh = Hybrid.materialize(plan, hybrid.donors, device="cpu").model.state_dict()
    live_weights = hybrid.model.state_dict()
    assert all(torch.equal(live_weights[n], w) for n, w in fresh.items())
    assert plan != Plan("A")


def test_one_function_records_a_run_in_a_session(tmp_path):
    from surgeon.core.session import SessionRecords
    from surgeon.probes.run import record_probe_results

    specs = [parse_probe("mc:arith_mc"), parse_probe("em:arith,limit=3")]
    target = SessionRecords(probes=[specs[0].to_json()], results=[{"model": "old"}])
    record_probe_results(target, specs, [{"model": "hybrid"}, {"model": "donor:A"}])
    record_probe_results(target, specs[1:], [{"model": "hybrid"}])
    assert target.probes == [specs[0].to_json(), specs[1].to_json()]  # each spec once, in order
    assert [r["model"] for r in target.results] == ["old", "hybrid", "donor:A", "hybrid"]
