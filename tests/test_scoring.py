"""Batched, prefix-cached scoring equals plain one-item-at-a-time forward passes."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny_models import save_char_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgeon.probes.scoring import cut_at_stop, greedy_generate, loglikelihoods


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory, donors_of):
    path = donors_of("olmoe", 1)[0]
    tok_dir = save_char_tokenizer(tmp_path_factory.mktemp("tok"))
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(tok_dir)


def reference(model, tok, prefix, ctx, cont):
    ids = tok(prefix + ctx, add_special_tokens=False)["input_ids"]
    cont_ids = tok(cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids + cont_ids])).logits[0]
    lp = F.log_softmax(logits.float(), -1)
    total, greedy = 0.0, True
    for j, t in enumerate(cont_ids):
        row = lp[len(ids) + j - 1]
        total += float(row[t])
        greedy &= int(row.argmax()) == t
    return total, greedy


@pytest.mark.parametrize("prefix", ["", "1+1=2 ab:ba "])
def test_loglikelihoods_equal_per_item_forward(model_and_tokenizer, prefix):
    model, tok = model_and_tokenizer
    reqs = [("12+7=", "19"), ("3+3=", "6"), ("rev:abc=", "cba"), ("9+90=", "99"), ("x", "yz"), ("1", "2")]
    got = loglikelihoods(model, tok, reqs, prefix=prefix, batch_size=4)
    for (ctx, cont), r in zip(reqs, got):
        want, greedy = reference(model, tok, prefix, ctx, cont)
        assert r.logprob == pytest.approx(want, abs=1e-4)
        assert r.greedy == greedy and r.tokens == len(cont)


def test_greedy_generate_matches_unbatched(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = ["12+7=", "rev:abcd=", "5+5=", "abc"]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=5, batch_size=3)
    single = [greedy_generate(model, tok, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(len(tok(s, add_special_tokens=False)["input_ids"]) <= 5 for s in batched)


def test_cut_at_stop():
    assert cut_at_stop("42\nQuestion: next", ("\n", "Question:")) == "42"
    assert cut_at_stop("no stop here", ("\n",)) == "no stop here"


def test_prefix_cached_generation_equals_the_whole_prompt_alone(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prefix = "1+1=2\nrev:ab=ba\n"
    prompts = ["12+7=", "rev:abcd=", "5+5=", "x"]
    cached = greedy_generate(model, tok, prompts, prefix=prefix, max_new_tokens=6, batch_size=3)
    alone = [greedy_generate(model, tok, [prefix + p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert cached == alone


def test_prefix_cache_uses_the_current_cache_api(model_and_tokenizer):
    # transformers 5.24 warns (FutureWarning) that `past_key_values` goes away in 5.40; both cached
    # paths (scoring and decoding from a shared prefix) must pass the cache by its current name.
    model, tok = model_and_tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        loglikelihoods(model, tok, [("12+7=", "19"), ("x", "yz")], prefix="1+1=2 ", batch_size=2)
        greedy_generate(model, tok, ["5+5=", "abc"], prefix="1+1=2\n", max_new_tokens=3, batch_size=2)
