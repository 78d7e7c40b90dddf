"""The scorer equals plain one-request-at-a-time forwards over lm-eval's token sequences, while
running each distinct context (and a common token prefix) once and dropping finished rows."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny_models import fed
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgeon.errors import SurgeonError
from surgeon.probes.generation import greedy_generate
from surgeon.probes.scoring import MIN_SHARED_PREFIX, loglikelihoods

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_LEN = 64  # the tiny donors' max_position_embeddings


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
def test_loglikelihoods_equal_a_plain_forward_per_request(char_olmoe, batch_size, max_batch_tokens):
    model, tok = char_olmoe
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


def test_each_context_and_its_choices_run_in_one_row_once(char_olmoe):
    model, tok = char_olmoe
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
    see another, and its scores would drift from the one-request-at-a-time reference. Rows with no
    branches rely on the model's causal mask keeping real tokens from the padding after them."""
    path = donors_of(model_type, 1)[0]
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    requests = [(ctx, c) for ctx in ("12+7=", "rev:abc=") for c in ("19", "cba", "1", "2345")]
    got = loglikelihoods(model, tok, requests, batch_size=2)
    assert_like_reference(model, tok, requests, got)
    # Rows without branches run under the model's own causal mask, padded on the right.
    plain = [(ctx, c) for ctx in ("12+7=", "rev:abcdef=", "1") for c in "19"]
    assert_like_reference(model, tok, plain, loglikelihoods(model, tok, plain, batch_size=3))


def test_a_sliding_window_shorter_than_a_request_is_the_models_to_apply(donors_of):
    """A packed row's tree mask reaches the model as given, so it would let a token see past a
    sliding window; where a request is longer than the window, each runs in a causal row of its own
    and the model applies its window, as it does for lm-eval."""
    path = donors_of("mistral", 1)[0]
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    model.config.sliding_window = 4
    requests = [(ctx, c) for ctx in ("12+7=", "rev:abcdef=") for c in ("19", "cba", "1")]
    with fed(model) as shapes:
        got = loglikelihoods(model, tok, requests, batch_size=16)
    assert sum(rows for rows, _ in shapes) == len(requests)
    assert_like_reference(model, tok, requests, got)


def test_a_common_token_prefix_runs_once_and_changes_no_score(char_olmoe):
    model, tok = char_olmoe
    preamble = "1+1=2\nrev:ab=ba\n3+4=7\n"  # 22 tokens shared by every context
    requests = [(preamble + q, a) for q, a in (("12+7=", "19"), ("5+5=", "10"), ("rev:abc=", "cba"), ("9+1=", "1"))]
    with fed(model) as shapes:
        got = loglikelihoods(model, tok, requests, batch_size=2)
    assert shapes[0] == (1, len(preamble))  # the preamble alone, once
    assert all(width <= len("rev:abc=") + 2 for _, width in shapes[1:])  # then only what follows it
    assert_like_reference(model, tok, requests, got)


def test_contexts_that_share_a_passage_run_in_one_row_with_the_passage_once(char_olmoe):
    """Several questions on one passage (BoolQ, RACE, MultiRC): the passage runs once, each question
    after it sees the passage and itself only, and every score stays the one-at-a-time score."""
    model, tok = char_olmoe
    passage = "rev:abcdef=fedcba;"  # 18 tokens, longer than each question
    questions = ["1+2=", "12+7=", "3+3="]
    requests = [(passage + q, c) for q in questions for c in "0123"]
    requests += [(passage, c) for c in "rx"]  # a context that is the shared prefix itself
    requests += [("9+9=", c) for c in "18"]  # and one that shares nothing
    with fed(model) as shapes:
        got = loglikelihoods(model, tok, requests, batch_size=16)
    assert shapes == [(2, len(passage) + sum(map(len, questions)))]
    assert_like_reference(model, tok, requests, got)

    # A family's row, its choices' tokens included, stays within the cap on tokens per forward.
    requests = [(passage + q, c) for q in questions for c in ("123", "456")] + [("9+9=", "18")]
    with fed(model) as shapes:
        got = loglikelihoods(model, tok, requests, max_batch_tokens=30)
    assert all(rows * width <= 30 for rows, width in shapes), shapes
    assert_like_reference(model, tok, requests, got)


def masks_given(model):
    seen = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    return seen, hook


def test_rows_without_branches_leave_the_causal_mask_to_the_model(char_olmoe):
    """A batch of plain contexts with one-token choices (BoolQ) needs no tree mask: the model's own
    causal one lets SDPA skip the blocks above the diagonal. Any branch (a choice of several tokens
    next to another, a shared passage) or a cached prefix keeps the tree mask."""
    model, tok = char_olmoe
    plain = [(ctx, c) for ctx in ("12+7=", "rev:abcdef=", "9=") for c in ("1", "2")]
    branched = plain + [("3+3=", "12"), ("3+3=", "61")]
    seen, hook = masks_given(model)
    try:
        got_plain = loglikelihoods(model, tok, plain, batch_size=16)
        got_branched = loglikelihoods(model, tok, branched, batch_size=16)
    finally:
        hook.remove()
    assert seen[0] is None
    assert seen[1] is not None and seen[1].dim() == 4
    assert_like_reference(model, tok, plain, got_plain)
    assert_like_reference(model, tok, branched, got_branched)


def test_a_short_shared_start_does_not_merge_long_contexts(char_olmoe):
    model, tok = char_olmoe
    start = "abcdefghij"  # 10 shared tokens: less than half of each context
    contexts = [start + tail * 2 + "=" for tail in ("0123456789", "9876543210")] + ["9+9="]
    requests = [(ctx, c) for ctx in contexts for c in "01"]
    with fed(model) as shapes:
        got = loglikelihoods(model, tok, requests, batch_size=16)
    assert shapes == [(3, len(contexts[0]))]  # a row each: merging would save too little
    assert_like_reference(model, tok, requests, got)


def test_short_common_prefixes_are_not_cached(char_olmoe):
    model, tok = char_olmoe
    requests = [("ab" + q, "1") for q in ("c=", "de=", "f=")]  # 4, 5 and 4 tokens
    assert len("ab") < MIN_SHARED_PREFIX
    with fed(model) as shapes:
        got = loglikelihoods(model, tok, requests)
    assert shapes == [(3, 5)]
    assert_like_reference(model, tok, requests, got)


def test_the_prefix_keyword_is_put_before_every_context(char_olmoe):
    model, tok = char_olmoe
    prefix = "1+1=2 ab:ba "
    requests = [("12+7=", "19"), ("x", "yz"), ("", "q")]
    got = loglikelihoods(model, tok, requests, prefix=prefix, batch_size=2)
    assert_like_reference(model, tok, [(prefix + c, x) for c, x in requests], got)


def test_too_long_a_request_loses_tokens_on_the_left_like_lm_eval(char_olmoe):
    model, tok = char_olmoe
    long_ctx = "abcdefghij" * 8 + "="  # 81 tokens, the model holds 64
    requests = [(long_ctx, "42"), (long_ctx, "7"), ("short=", "1")]
    got = loglikelihoods(model, tok, requests, batch_size=2)
    assert_like_reference(model, tok, requests, got)
    with pytest.raises(SurgeonError, match="longer than the model's 64-token context"):
        loglikelihoods(model, tok, [("a", "1" * 65)])


def test_bad_input_is_a_one_line_error(char_olmoe):
    model, tok = char_olmoe
    with pytest.raises(SurgeonError, match="empty continuation"):
        loglikelihoods(model, tok, [("12+7=", "")])
    with pytest.raises(SurgeonError, match="batch_size"):
        loglikelihoods(model, tok, [("12+7=", "1")], batch_size=0)
    with pytest.raises(SurgeonError, match="max_batch_tokens"):
        greedy_generate(model, tok, ["1+"], max_batch_tokens=0)
    with pytest.raises(SurgeonError, match="max_new_tokens 64 leaves no room"):
        greedy_generate(model, tok, ["1+"], max_new_tokens=64)


def test_progress_counts_requests_then_contexts_up_to_the_total(char_olmoe):
    model, tok = char_olmoe
    seen = []
    requests = [(ctx, c) for ctx in ("1=", "22=", "333=", "4444=", "5") for c in ("1", "23")]
    loglikelihoods(model, tok, requests, batch_size=2, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(4, 10), (8, 10), (10, 10)]
    seen.clear()
    greedy_generate(model, tok, ["1=", "22=", "333="], max_new_tokens=2, batch_size=2,
                    progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]  # each prompt as it finishes


def test_cached_paths_use_the_current_cache_api(char_olmoe):
    # transformers 5.24 warns (FutureWarning) that `past_key_values` goes away in 5.40; every
    # cached path (prefix, context rows, decoding) must pass the cache by its current name.
    model, tok = char_olmoe
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        loglikelihoods(model, tok, [("1+1=2 12+7=", "19"), ("1+1=2 12+8=", "20")], prefix="0+0=0 ", batch_size=2)
        greedy_generate(model, tok, ["5+5=", "abc"], prefix="1+1=2\n3+3=6\n", max_new_tokens=3, batch_size=2)
