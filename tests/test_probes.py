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
def session(donors_of, tmp_path, cli):
    a, b = donors_of("olmoe", 2)
    s = tmp_path / "s.json"
    r = cli("export", tmp_path / "out", "--base", a, "--take", f"experts={b}", "--save-session", s)
    assert r.returncode == 0, r.stderr
    return s


def test_cli_probe_records_results_and_replay_reproduces_them(session, tmp_path, cli):
    arc = write_jsonl(tmp_path / "arc.jsonl", ARC)
    r = cli("probe", session, "--probe", f"mc:{arc}", "--probe", f"ppl:{arc}", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
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

    r = cli("replay", session, "--probes", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 per-item difference(s)" in r.stdout

    # a tampered recording is caught item by item
    saved["results"][0]["outcomes"][0] = 1 - saved["results"][0]["outcomes"][0]
    session.write_text(json.dumps(saved))
    r = cli("replay", session, "--probes", "--device", "cpu", "--json")
    assert r.returncode == 1
    assert len(json.loads(r.stdout)["differences"]) == 1


def test_donor_scores_come_from_the_cache_the_second_time(session, tmp_path, cli):
    arc = write_jsonl(tmp_path / "arc.jsonl", ARC)
    cli("probe", session, "--probe", f"mc:{arc}", "--device", "cpu", "--no-save")
    r = cli("probe", session, "--probe", f"mc:{arc}", "--device", "cpu")
    assert r.returncode == 0
    donors = [x for x in json.loads(session.read_text())["results"] if x["model"].startswith("donor:")]
    assert donors and all(x["cached"] for x in donors)


def test_probe_list(cli):
    r = cli("probe", "--list")
    assert r.returncode == 0
    for name in ("mc", "em", "ppl", "kl", "arith", "reverse_mc"):
        assert name in r.stdout


@pytest.mark.parametrize("probe, needle", [
    ("bogus:arith", "unknown probe 'bogus'"),
    ("em:arith,limit=x", "limit must be an integer"),
    ("mc:arith", "needs multiple-choice items"),
])
def test_bad_probe_specs(session, cli, probe, needle):
    before = session.read_bytes()
    r = cli("probe", session, "--probe", probe, "--device", "cpu")
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert session.read_bytes() == before  # a failed probe run leaves the session intact


def test_probe_file_with_missing_field(session, tmp_path, cli):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": {"text": ["a"], "label": ["A"]}}])
    before = session.read_bytes()
    r = cli("probe", session, "--probe", f"mc:{bad},fmt=arc", "--device", "cpu")
    assert r.returncode == 2 and "answerKey" in r.stderr and str(bad) in r.stderr
    assert session.read_bytes() == before


def test_device_that_does_not_exist(session, cli):
    r = cli("probe", session, "--probe", "em:arith", "--device", "cuda:7")
    assert r.returncode == 2 and "cuda:7" in r.stderr and "Traceback" not in r.stderr
