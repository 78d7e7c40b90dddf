"""Probes equal independent per-item references; the CLI records, compares and replays them."""

import json
from pathlib import Path

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
    """log P(continuation | context) over lm-eval's tokens: the whole string encoded once, the
    continuation's tokens being what follows the context's."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(float(lp[j - 1, whole[j]]) for j in range(n_ctx, len(whole)))


def numpy_argmax(scores):
    import numpy as np

    return int(np.argmax(np.array(scores)))


@pytest.mark.parametrize("shots", [0, 1])  # prompts within the tiny model's 64 positions: no truncation
def test_mc_accuracy_equals_plain_forward_reference(tiny, tmp_path, shots):
    model, tok = tiny
    rows = ARC + [{"id": "q6", "question": "é", "choices": {"text": ["éé", "ab", "ça"], "label": ["A", "B", "C"]},
                   "answerKey": "C"}]  # characters and bytes differ: acc_norm and acc_bytes differ in kind
    data_file = write_jsonl(tmp_path / "arc.jsonl", rows)
    spec = parse_probe(f"mc:{data_file},limit=4,shots={shots}")
    data = load_probe_data(spec)
    out = evaluate(model, tok, spec, data, batch_size=2)
    assert len(data.shots) == len(data.items)
    want = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for item, item_shots in zip(data.items, data.shots):
        assert len(item_shots) == shots and item not in item_shots
        ctx = "".join(f"Question: {s.question}\nAnswer: {s.choices[s.answer]}\n\n" for s in item_shots)
        ctx += f"Question: {item.question}\nAnswer:"
        lls = [plain_logprob(model, tok, ctx, " " + c) for c in item.choices]
        want["acc"].append(float(numpy_argmax(lls) == item.answer))
        want["acc_norm"].append(float(numpy_argmax([ll / len(c) for ll, c in zip(lls, item.choices)]) == item.answer))
        want["acc_bytes"].append(
            float(numpy_argmax([ll / len(c.encode()) for ll, c in zip(lls, item.choices)]) == item.answer))
    assert out.outcomes == want["acc"]
    assert out.extra == {"acc_norm": want["acc_norm"], "acc_bytes": want["acc_bytes"]}
    assert out.ids == [i.id for i in data.items]
    # One lm-eval-like sample per item, whose metric values are the outcomes.
    assert [s["doc_id"] for s in out.samples] == out.ids
    assert [s["acc"] for s in out.samples] == out.outcomes
    assert [s["acc_norm"] for s in out.samples] == want["acc_norm"]
    first = out.samples[0]
    assert first["prompt"] == data.contexts()[0] and first["target"] == data.items[0].answer
    assert first["arguments"] == [[first["prompt"], " " + c] for c in data.items[0].choices]
    assert [r[0][0] for r in first["resps"]] == pytest.approx(
        [plain_logprob(model, tok, first["prompt"], " " + c) for c in data.items[0].choices], abs=1e-4)
    assert all(isinstance(r[0][1], bool) for r in first["resps"])  # lm-eval's: per request, per repeat


def test_a_tie_goes_to_the_first_choice_as_numpys_argmax():
    from surgeon.probes.multiple_choice import first_best

    for scores in ([-1.0, -1.0, -2.0], [-3.0, -1.0, -1.0], [0.0], [-2.0, -1.0]):
        assert first_best(scores) == numpy_argmax(scores)


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


def plain_greedy(model, tok, context, max_new_tokens, until):
    """Greedy decoding one token at a time over the whole prompt, cut as lm-eval cuts (split at each stop)."""
    ids = tok(context, add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    text = tok.decode(new, skip_special_tokens=True)
    for stop in until:
        text = text.split(stop)[0]
    return text


GSM8K_ROWS = [{"question": q, "answer": f"so {a}\n#### {a}"} for q, a in
              [("1+2", "3"), ("20+22", "42"), ("7+8", "15"), ("1000+234", "1,234"), ("9", "[invalid]")]]


def test_gsm8k_exact_match_is_lmevals_filters_and_metric(tiny, tmp_path):
    """The outcome is lm-eval's exact_match after its flexible-extract filter, strict-match an extra,
    both computed by lm-eval's own filter and metric from the same generations."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    from surgeon.probes.answers import is_correct

    model, tok = tiny
    spec = parse_probe(f"em:{write_jsonl(tmp_path / 'gsm8k.jsonl', GSM8K_ROWS)},max_new_tokens=12")
    data = load_probe_data(spec)
    out = evaluate(model, tok, spec, data, batch_size=2)
    until = ("Question:", "</s>", "<|im_end|>")
    assert out.outputs == [plain_greedy(model, tok, ctx, 12, until) for ctx in data.contexts()]
    ignore = {"regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"], "ignore_case": True}
    strict = RegexFilter(regex_pattern=r"#### (\-?[0-9\.\,]+)")
    flexible = RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    want = {}
    for name, f in (("strict-match", strict), ("flexible-extract", flexible)):
        answers = [r[0] for r in f.apply([[o] for o in out.outputs], [])]
        want[name] = [float(exact_match_hf_evaluate(predictions=[a], references=[row["answer"]], **ignore)["exact_match"])
                      for a, row in zip(answers, GSM8K_ROWS)]
        assert [s["filtered_resps"][name] for s in out.samples] == answers
    assert out.outcomes == want["flexible-extract"]
    assert out.extra == {"exact_match,strict-match": want["strict-match"]}
    assert [s["exact_match,flexible-extract"] for s in out.samples] == want["flexible-extract"]
    first = out.samples[0]
    assert first["target"] == GSM8K_ROWS[0]["answer"] and first["resps"] == [[out.outputs[0]]]
    assert first["arguments"] == [[data.contexts()[0], {"until": list(until), "max_gen_toks": 12}]]
    # An explicit extract= mode decides the outcome (against the gold number); lm-eval's both stay extras.
    spec = parse_probe(f"em:{tmp_path / 'gsm8k.jsonl'},max_new_tokens=12,extract=last_number")
    again = evaluate(model, tok, spec, data, batch_size=2)
    assert again.outcomes == [float(is_correct(o, i.answer, "last_number")) for o, i in zip(out.outputs, data.items)]
    assert again.extra == {"exact_match,strict-match": want["strict-match"],
                           "exact_match,flexible-extract": want["flexible-extract"]}


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


def test_donor_scores_are_measured_again_when_the_probe_file_or_a_donor_changes(donors_of, tmp_path, run_cli):
    """The score cache is keyed by content: an edited probe file, or donor bytes changed where the
    sparse fingerprint does not look (mtime set back, as `touch -r` does), is a new measurement."""
    import os
    import shutil

    from surgeon.core.donor import SAMPLE_BLOCKS, SAMPLE_BYTES, open_donor

    a, b = (shutil.copytree(d, tmp_path / f"d{i}") for i, d in enumerate(donors_of("olmoe", 2)))
    s = tmp_path / "s.json"
    assert run_cli("export", tmp_path / "out", "--base", a, "--take", f"experts={b}",
                   "--save-session", s).returncode == 0
    arc = write_jsonl(tmp_path / "arc.jsonl", ARC)

    def donor_records() -> dict:
        r = run_cli("probe", s, "--probe", f"mc:{arc}", "--device", "cpu")
        assert r.returncode == 0, r.stderr
        results = json.loads(s.read_text())["results"]
        run = results[-1]["run"]
        return {x["model"]: x for x in results if x["run"] == run and x["model"].startswith("donor:")}

    assert not any(x["cached"] for x in donor_records().values())
    assert all(x["cached"] for x in donor_records().values())

    edited = [dict(item, answerKey="B") if item["id"] == "q1" else item for item in ARC]
    write_jsonl(arc, edited)  # the same path, edited in place
    assert not any(x["cached"] for x in donor_records().values())
    assert all(x["cached"] for x in donor_records().values())

    shard = Path(b) / "model.safetensors"
    size = shard.stat().st_size
    step = (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1)
    sampled = [(i * step, i * step + SAMPLE_BYTES) for i in range(SAMPLE_BLOCKS)]
    start = 8 + int.from_bytes(shard.read_bytes()[:8], "little")  # tensor bytes start after the header
    # 16 bytes of weights between two sampled blocks: the lowest byte of each float flipped.
    gap = next((lo_end, hi_start) for (_, lo_end), (hi_start, _) in zip(sampled, sampled[1:])
               if hi_start - lo_end >= 64 and lo_end >= start)
    at = gap[0] + 16 - gap[0] % 4
    before_fp = open_donor(b).fingerprint
    st = shard.stat()
    with open(shard, "r+b") as fh:
        fh.seek(at)
        old = fh.read(16)
        fh.seek(at)
        fh.write(bytes(x ^ 1 if i % 4 == 0 else x for i, x in enumerate(old)))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert open_donor(b).fingerprint == before_fp  # what the old cache key rested on did not change
    after = donor_records()
    assert after["donor:A"]["cached"] and not after["donor:B"]["cached"]


def test_probe_list(run_cli):
    r = run_cli("probe", "--list")
    assert r.returncode == 0
    for name in ("mc", "em", "ppl", "kl", "arith", "reverse_mc"):
        assert name in r.stdout


@pytest.mark.parametrize("probe, needle", [
    ("bogus:arith", "unknown probe 'bogus'"),
    ("em:arith,limit=x", "limit must be an integer"),
    ("mc:arith", "needs multiple-choice items"),
    ("em:arith,limit=5,limit=50", "option limit is given twice"),
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
                        "ppl": ("perplexity", False, False, False), "kl": ("kl", False, False, True),
                        "lmeval": ("acc", True, True, False)}
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


# ---------------------------------------------------------------- probe options
def test_options_map_fields_and_round_trip_through_json_and_the_label(tmp_path):
    from surgeon.probes import spec_from_json

    spec = parse_probe(r"em:qa.jsonl,first=3,until=\n\n|Q\|A:|a\,b|back\\,question=q,answer=a")
    assert spec.until == ("\n\n", "Q|A:", "a,b", "back\\")
    assert spec.fields == (("answer", "a"), ("question", "q"))
    assert spec.to_json()["fields"] == {"answer": "a", "question": "q"}
    assert spec.to_json()["until"] == ["\n\n", "Q|A:", "a,b", "back\\"]
    assert spec_from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert parse_probe(spec.label) == spec
    assert hash(spec) == hash(parse_probe(spec.label))  # hashable: the runner keys caches by spec
    # The mapping reaches the reader: the error message's own example works.
    data_file = tmp_path / "qa.jsonl"
    data_file.write_text('{"q": "Capital of France?", "a": "Paris"}\n{"q": "Two plus two?", "a": "4"}\n')
    data = load_probe_data(parse_probe(f"em:{data_file},question=q,answer=a"))
    assert [(i.question, i.answer) for i in data.items] == [("Capital of France?", "Paris"), ("Two plus two?", "4")]


def test_an_unset_max_new_tokens_keeps_the_label_and_old_sessions_keep_theirs():
    from surgeon.probes import spec_from_json

    assert parse_probe("em:arith").label == "em:arith"
    assert parse_probe("em:arith,max_new_tokens=16").label == "em:arith,max_new_tokens=16"
    old = {"kind": "em", "data": "arith", "seed": 0, "shots": 0, "cot": False, "extract": "exact",
           "max_new_tokens": 16}  # as every spec was written before fewshot_order existed
    assert spec_from_json(old).label == "em:arith"
    new = parse_probe("em:arith,max_new_tokens=16").to_json()
    assert spec_from_json(new).max_new_tokens == 16


def test_first_takes_the_first_items_in_file_order(tmp_path):
    data_file = write_jsonl(tmp_path / "arc.jsonl", ARC)
    assert [i.id for i in load_probe_data(parse_probe(f"mc:{data_file},first=2")).items] == ["q1", "q2"]
    limited = [i.id for i in load_probe_data(parse_probe(f"mc:{data_file},limit=2,seed=5")).items]
    assert len(limited) == 2


@pytest.mark.parametrize("probe, needle", [
    ("mc:arith_mc,limit=2,first=2", "limit=N (a seeded subset) and first=N (the first N items) exclude each other"),
    ("mc:arith_mc,first=0", "first must be at least 1"),
    ("mc:arith_mc,fewshot=arith_mc", "fewshot=FILE needs shots=K"),
    ("mc:arith_mc,fewshot_order=random", "fewshot_order must be one of lmeval, fixed"),
    ("em:arith,template=chat", "template must be one of qa, raw"),
    ("em:arith,extract=([", "is not exact, gsm8k, last_number or a valid regex"),
    ("em:arith,until=a||b", "an empty stop string"),
    (r"em:arith,until=\x", r"unknown escape \x"),
    ("em:arith,colour=red", "options: cot, extract, fewshot, fewshot_order, first, fmt, limit, max_new_tokens"),
    ("em:arith,colour=red", "or map a field: question, answer, choices"),
])
def test_bad_options_name_themselves(probe, needle):
    from surgeon.errors import SurgeonError

    with pytest.raises(SurgeonError) as e:
        parse_probe(probe)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_fewshot_file_of_another_kind_and_shots_for_text_probes_are_refused(tmp_path):
    from surgeon.errors import SurgeonError

    data_file = write_jsonl(tmp_path / "arc.jsonl", ARC)
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}] * 1)
    # Exemplars are read by the evaluated file's reader: an ARC reader misses ARC's fields ...
    with pytest.raises(SurgeonError, match=r"qa\.jsonl:1: field 'choices' is missing"):
        load_probe_data(parse_probe(f"mc:{data_file},shots=1,fewshot={qa}"))
    # ... and the generic reader reads items of another kind.
    generic_mc = Path(__file__).parent / "data" / "generic_mc.jsonl"
    with pytest.raises(SurgeonError, match=r"qa\.jsonl: probe mc needs multiple-choice items"):
        load_probe_data(parse_probe(f"mc:{generic_mc},shots=1,fewshot={qa}"))
    with pytest.raises(SurgeonError, match="shots= applies to items with answers; ppl reads text"):
        load_probe_data(parse_probe(f"ppl:{data_file},shots=1"))
