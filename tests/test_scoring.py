"""The scorer equals plain one-request-at-a-time forwards over lm-eval's token sequences, while
running each distinct context (and a common token prefix) once and dropping finished rows."""

import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgeon.errors import SurgeonError
from surgeon.probes.scoring import (
    MIN_SHARED_PREFIX,
    _settled,
    cut_at_stop,
    greedy_generate,
    loglikelihoods,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_LEN = 64  # the tiny donors' max_position_embeddings


@pytest.fixture(scope="module")
def model_and_tokenizer(donors_of):
    path = donors_of("olmoe", 1)[0]  # saved with the character tokenizer (bos 1, eos 2)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@contextmanager
def fed(model):
    """The shape of input_ids of every forward the model runs."""
    shapes = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                             with_kwargs=True)
    try:
        yield shapes
    finally:
        handle.remove()


def lm_eval_tokens(tok, ctx, cont):
    """lm-eval's split, written out: trailing whitespace to the continuation, encode whole and
    context, an empty context is bos, then left truncation."""
    if ctx == "":
        ctx_ids, cont_ids = [tok.bos_token_id], tok(cont, add_special_tokens=False)["input_ids"]
    else:
        n = len(ctx) - len(ctx.rstrip())
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        whole = tok(ctx + cont)["input_ids"]
        ctx_ids = tok(ctx)["input_ids"]
        cont_ids = whole[len(ctx_ids):]
    return (ctx_ids + cont_ids)[-(MAX_LEN + 1):], len(cont_ids)


def reference(model, tok, ctx, cont):
    seq, n = lm_eval_tokens(tok, ctx, cont)
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([seq[:-1]])).logits[0].float(), -1)[-n:]
    target = torch.tensor(seq[-n:])
    return float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()), n


def greedy_continuation(model, tok, ctx, n):
    ids = tok(ctx)["input_ids"]
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return tok.decode(ids[-n:])


def assert_like_reference(model, tok, requests, got):
    assert len(got) == len(requests)
    for (ctx, cont), r in zip(requests, got):
        want, greedy, n = reference(model, tok, ctx, cont)
        assert r.logprob == pytest.approx(want, abs=1e-4), (ctx, cont)
        assert (r.greedy, r.tokens) == (greedy, n), (ctx, cont)


@pytest.mark.parametrize("batch_size,max_batch_tokens", [(16, None), (3, 12), (1, 1)])
def test_loglikelihoods_equal_a_plain_forward_per_request(model_and_tokenizer, batch_size, max_batch_tokens):
    model, tok = model_and_tokenizer
    best = greedy_continuation(model, tok, "12+7=", 3)
    requests = [
        ("12+7=", "19"), ("12+7=", "1"), ("12+7=", "2"), ("12+7=", best),  # one context, short and long choices
        ("rev:abc=", "cba"), ("9+90=", "99"), ("x", "yz"), ("1", "2"),  # different lengths: padding
        ("answer: ", "yes"), ("answer: ", "no"), ("answer:  ", "x"),  # trailing spaces move to the continuation
        ("", "abc"), ("", "q"),  # no context: bos
        ("a much longer context that pads the rest=", "ok"),
    ]
    got = loglikelihoods(model, tok, requests, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    assert_like_reference(model, tok, requests, got)
    assert got[3].greedy and got[3].tokens == 3  # the model's own greedy continuation is recognised


def test_each_context_and_its_choices_run_in_one_row_once(model_and_tokenizer):
    model, tok = model_and_tokenizer
    single = [(ctx, c) for ctx in ("12+7=", "3+3=", "rev:ab=") for c in "0123"]
    with fed(model) as shapes:
        got = loglikelihoods(model, tok, single, batch_size=16)
    assert shapes == [(3, 7)]  # three contexts, one forward, nothing per one-token choice
    assert_like_reference(model, tok, single, got)

    multi = [(ctx, c) for ctx in ("12+7=", "3+3=") for c in ("19", "6", "123", "7")]
    with fed(model) as shapes:
        got = loglikelihoods(model, tok, multi, batch_size=16)
    # one row per context: its 5 tokens, then each choice but its last token ("1", "12"): 8 wide
    assert shapes == [(2, 8)]
    assert_like_reference(model, tok, multi, got)


@pytest.mark.parametrize("model_type", ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "llama",
                                        "mistral", "qwen2"])
def test_every_architecture_honours_the_tree_mask(donors_of, model_type):
    """Packing a context with all its choices relies on the model taking a custom 4D attention mask
    and explicit positions as given: a model that rebuilt its own causal mask would let one choice
    see another, and its scores would drift from the one-request-at-a-time reference."""
    path = donors_of(model_type, 1)[0]
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    requests = [(ctx, c) for ctx in ("12+7=", "rev:abc=") for c in ("19", "cba", "1", "2345")]
    got = loglikelihoods(model, tok, requests, batch_size=2)
    assert_like_reference(model, tok, requests, got)


def test_a_common_token_prefix_runs_once_and_changes_no_score(model_and_tokenizer):
    model, tok = model_and_tokenizer
    preamble = "1+1=2\nrev:ab=ba\n3+4=7\n"  # 22 tokens shared by every context
    requests = [(preamble + q, a) for q, a in (("12+7=", "19"), ("5+5=", "10"), ("rev:abc=", "cba"), ("9+1=", "1"))]
    with fed(model) as shapes:
        got = loglikelihoods(model, tok, requests, batch_size=2)
    assert shapes[0] == (1, len(preamble))  # the preamble alone, once
    assert all(width <= len("rev:abc=") + 2 for _, width in shapes[1:])  # then only what follows it
    assert_like_reference(model, tok, requests, got)


def test_short_common_prefixes_are_not_cached(model_and_tokenizer):
    model, tok = model_and_tokenizer
    requests = [("ab" + q, "1") for q in ("c=", "de=", "f=")]  # 4, 5 and 4 tokens
    assert len("ab") < MIN_SHARED_PREFIX
    with fed(model) as shapes:
        got = loglikelihoods(model, tok, requests)
    assert shapes == [(3, 5)]
    assert_like_reference(model, tok, requests, got)


def test_the_prefix_keyword_is_put_before_every_context(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prefix = "1+1=2 ab:ba "
    requests = [("12+7=", "19"), ("x", "yz"), ("", "q")]
    got = loglikelihoods(model, tok, requests, prefix=prefix, batch_size=2)
    assert_like_reference(model, tok, [(prefix + c, x) for c, x in requests], got)


def test_too_long_a_request_loses_tokens_on_the_left_like_lm_eval(model_and_tokenizer):
    model, tok = model_and_tokenizer
    long_ctx = "abcdefghij" * 8 + "="  # 81 tokens, the model holds 64
    requests = [(long_ctx, "42"), (long_ctx, "7"), ("short=", "1")]
    got = loglikelihoods(model, tok, requests, batch_size=2)
    assert_like_reference(model, tok, requests, got)
    with pytest.raises(SurgeonError, match="longer than the model's 64-token context"):
        loglikelihoods(model, tok, [("a", "1" * 65)])


def test_bad_input_is_a_one_line_error(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(SurgeonError, match="empty continuation"):
        loglikelihoods(model, tok, [("12+7=", "")])
    with pytest.raises(SurgeonError, match="batch_size"):
        loglikelihoods(model, tok, [("12+7=", "1")], batch_size=0)
    with pytest.raises(SurgeonError, match="max_batch_tokens"):
        greedy_generate(model, tok, ["1+"], max_batch_tokens=0)
    with pytest.raises(SurgeonError, match="max_new_tokens 64 leaves no room"):
        greedy_generate(model, tok, ["1+"], max_new_tokens=64)


def test_progress_counts_requests_then_contexts_up_to_the_total(model_and_tokenizer):
    model, tok = model_and_tokenizer
    seen = []
    requests = [(ctx, c) for ctx in ("1=", "22=", "333=", "4444=", "5") for c in ("1", "23")]
    loglikelihoods(model, tok, requests, batch_size=2, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(4, 10), (8, 10), (10, 10)]
    seen.clear()
    greedy_generate(model, tok, ["1=", "22=", "333="], max_new_tokens=2, batch_size=2,
                    progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]  # each prompt as it finishes


# --- greedy generation -------------------------------------------------------------------------

def plain_greedy(model, tok, prompt, max_new, until=(), eos=2):
    """One prompt, no cache, no padding: a full forward per token, then lm-eval's cut."""
    ids = tok(prompt)["input_ids"][-(MAX_LEN - max_new):]
    new = []
    with torch.no_grad():
        while len(new) < max_new:
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(token)
            if token == eos:
                break
    return cut_at_stop(tok.decode(new, skip_special_tokens=True), (*until, "<eos>"))


PROMPTS = ["12+7=", "rev:abcd=", "5+5=", "abc", "a much longer prompt than the others="]


def test_greedy_generate_equals_plain_decoding_one_prompt_at_a_time(model_and_tokenizer):
    model, tok = model_and_tokenizer
    raw = [plain_greedy(model, tok, p, 20) for p in PROMPTS]
    # stop strings that really occur, so some rows finish early and others run to the limit
    until = (raw[0][2:4], raw[1][3:4])
    want = [plain_greedy(model, tok, p, 20, until) for p in PROMPTS]
    assert want != raw
    for batch_size, max_batch_tokens in ((16, None), (3, 20), (1, None)):
        with fed(model) as shapes:
            got = greedy_generate(model, tok, PROMPTS, until=until, max_new_tokens=20, batch_size=batch_size,
                                  max_batch_tokens=max_batch_tokens)
        assert got == want
        assert sum(rows for rows, _ in shapes) < 20 * len(PROMPTS)  # stopped rows ran no further
    assert greedy_generate(model, tok, PROMPTS, stop=until, max_new_tokens=20) == want  # the older keyword


def test_a_finished_row_leaves_the_running_batch(model_and_tokenizer):
    model, tok = model_and_tokenizer
    first = tok(plain_greedy(model, tok, PROMPTS[0], 3), add_special_tokens=False)["input_ids"]
    old_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = first[1]  # the first prompt now ends at its second token
    try:
        want = [plain_greedy(model, tok, p, 6, eos=first[1]) for p in PROMPTS]
        with fed(model) as shapes:
            got = greedy_generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=16)
    finally:
        model.generation_config.eos_token_id = old_eos
    assert got == want
    rows = [b for b, _ in shapes]
    assert rows[0] == len(PROMPTS) and min(rows) < len(PROMPTS)  # later steps run fewer rows
    assert rows == sorted(rows, reverse=True)


def test_a_waiting_prompt_takes_the_slot_of_a_finished_row(model_and_tokenizer):
    """Continuous batching: with two slots and five prompts, a prompt is prefilled while another row is
    still decoding, and the next step runs them together; every text is still the one-at-a-time one."""
    model, tok = model_and_tokenizer
    raw = [plain_greedy(model, tok, p, 20) for p in PROMPTS]
    until = (raw[0][2:4], raw[1][3:4])
    with fed(model) as shapes:
        got = greedy_generate(model, tok, PROMPTS, until=until, max_new_tokens=20, batch_size=2)
    assert got == [plain_greedy(model, tok, p, 20, until) for p in PROMPTS]
    joined = [j for j in range(1, len(shapes) - 1)
              if shapes[j][1] > 1 and shapes[j + 1][1] == 1 and shapes[j + 1][0] > shapes[j][0]]
    assert joined, shapes


def test_equal_prompts_decode_once(model_and_tokenizer):
    model, tok = model_and_tokenizer
    seen = []
    with fed(model) as shapes:
        got = greedy_generate(model, tok, ["1+1=", "2+2=", "1+1="], max_new_tokens=3,
                              progress=lambda d, t: seen.append((d, t)))
    assert shapes[0] == (2, 4) and got[0] == got[2] == plain_greedy(model, tok, "1+1=", 3)
    assert seen[-1] == (3, 3) and {d for d, _ in seen} <= {1, 2, 3}


def test_a_long_prompt_keeps_its_last_tokens_like_lm_eval(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = ["abcdefghij" * 7 + "=", "1+1="]  # 71 tokens: only the last 64 - 8 are seen
    want = [plain_greedy(model, tok, p, 8) for p in prompts]
    assert greedy_generate(model, tok, prompts, max_new_tokens=8, batch_size=2) == want


def test_cut_at_stop_cuts_at_each_stop_in_turn():
    assert cut_at_stop("42\nQuestion: next", ("\n", "Question:")) == "42"
    assert cut_at_stop("no stop here", ("\n",)) == "no stop here"
    # lm-eval splits on each string in turn: "bc" is searched only in what "cd" left
    assert cut_at_stop("abcd", ("cd", "bc")) == "ab"


def test_decoding_stops_only_once_more_tokens_cannot_change_the_cut():
    slack = "...."  # the last characters of a decoded text may still change
    assert _settled("42\n\nQuestion: 7" + slack, ("\n\n", "Question:"))
    assert not _settled("42\n\n", ("\n\n",))  # too close to the end to trust
    assert not _settled("no stop yet" + slack, ("\n\n",))
    # "qcd" is found, but "cdX" (cut at first) may still appear across the end and cut at 1
    assert not _settled("qcd" + slack, ("cdX", "qcd"))
    assert _settled("qcdY" + slack, ("cdX", "qcd"))
    assert _settled("q\n\nab" + slack, ("abc", "\n\n"))  # "abc" may come, but would cut after "\n\n"


def test_prefix_cached_generation_equals_the_whole_prompt_alone(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prefix = "1+1=2\nrev:ab=ba\n"
    prompts = ["12+7=", "rev:abcd=", "5+5=", "x"]
    with fed(model) as shapes:
        cached = greedy_generate(model, tok, prompts, prefix=prefix, max_new_tokens=6, batch_size=3)
    assert shapes[0] == (1, len(prefix))
    alone = [plain_greedy(model, tok, prefix + p, 6) for p in prompts]
    assert cached == alone


def test_cached_paths_use_the_current_cache_api(model_and_tokenizer):
    # transformers 5.24 warns (FutureWarning) that `past_key_values` goes away in 5.40; every
    # cached path (prefix, context rows, decoding) must pass the cache by its current name.
    model, tok = model_and_tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        loglikelihoods(model, tok, [("1+1=2 12+7=", "19"), ("1+1=2 12+8=", "20")], prefix="0+0=0 ", batch_size=2)
        greedy_generate(model, tok, ["5+5=", "abc"], prefix="1+1=2\n3+3=6\n", max_new_tokens=3, batch_size=2)
