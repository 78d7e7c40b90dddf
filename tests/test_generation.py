"""Greedy generation equals plain one-prompt-at-a-time decoding (a full forward per token, then
lm-eval's cut), while decoding rows in slots, dropping finished rows, taking waiting prompts into
free slots and checking draft tokens looked up in each row's own tokens."""

import os

import pytest
import torch
from tiny_models import fed
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgeon.probes.attention import grouped_kv_on_cpu
from surgeon.probes.generation import _settled, cut_at_stop, greedy_generate
from surgeon.probes.kv_slots import plain_layers
from surgeon.probes.lookup import PromptLookup

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_LEN = 64  # the tiny donors' max_position_embeddings


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


def test_greedy_generate_equals_plain_decoding_one_prompt_at_a_time(char_olmoe):
    model, tok = char_olmoe
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


def test_a_finished_row_leaves_the_running_batch(char_olmoe):
    model, tok = char_olmoe
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


def test_a_waiting_prompt_takes_the_slot_of_a_finished_row(char_olmoe):
    """Continuous batching: with two slots and five prompts, a prompt is prefilled while another row is
    still decoding, and the next step runs them together; every text is still the one-at-a-time one."""
    model, tok = char_olmoe
    raw = [plain_greedy(model, tok, p, 20) for p in PROMPTS]
    until = (raw[0][2:4], raw[1][3:4])
    with fed(model) as shapes:
        got = greedy_generate(model, tok, PROMPTS, until=until, max_new_tokens=20, batch_size=2)
    assert got == [plain_greedy(model, tok, p, 20, until) for p in PROMPTS]
    joined = [j for j in range(1, len(shapes) - 1)
              if shapes[j][1] > 1 and shapes[j + 1][1] == 1 and shapes[j + 1][0] > shapes[j][0]]
    assert joined, shapes


def test_equal_prompts_decode_once(char_olmoe):
    model, tok = char_olmoe
    seen = []
    with fed(model) as shapes:
        got = greedy_generate(model, tok, ["1+1=", "2+2=", "1+1="], max_new_tokens=3,
                              progress=lambda d, t: seen.append((d, t)))
    assert shapes[0] == (2, 4) and got[0] == got[2] == plain_greedy(model, tok, "1+1=", 3)
    assert seen[-1] == (3, 3) and {d for d, _ in seen} <= {1, 2, 3}


def test_a_long_prompt_keeps_its_last_tokens_like_lm_eval(char_olmoe):
    model, tok = char_olmoe
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


def test_prefix_cached_generation_equals_the_whole_prompt_alone(char_olmoe):
    model, tok = char_olmoe
    prefix = "1+1=2\nrev:ab=ba\n"
    prompts = ["12+7=", "rev:abcd=", "5+5=", "x"]
    with fed(model) as shapes:
        cached = greedy_generate(model, tok, prompts, prefix=prefix, max_new_tokens=6, batch_size=3)
    assert shapes[0] == (1, len(prefix))
    alone = [plain_greedy(model, tok, prefix + p, 6) for p in prompts]
    assert cached == alone


# --- draft tokens ------------------------------------------------------------------------------

def test_a_draft_is_what_followed_the_latest_earlier_occurrence_of_the_last_tokens():
    lookup = PromptLookup([5, 6, 7, 9, 5, 6, 8, 1, 5, 6])
    # "5 6" occurred twice before: the latest was followed by 8 1
    assert lookup.draft(2) == [8, 1]
    assert lookup.draft(5) == [8, 1, 5, 6]  # up to the end of the sequence
    lookup.append(8)
    assert lookup.draft(3) == [1, 5, 6]  # "5 6 8" once before
    lookup.append(4)
    assert lookup.draft(3) == []  # 4 never occurred before
    assert lookup.draft(0) == [] and PromptLookup([3]).draft(2) == []


def test_draft_tokens_keep_the_text_and_save_forwards(char_olmoe):
    """A tiny random model repeats itself, so drafts looked up in its own tokens are often right: the
    text is the one-token-per-step text, in fewer forwards, some of them several tokens wide."""
    model, tok = char_olmoe
    prompts = ["ab" * 6, "12+17=", "rev:abcd=", "xyzxyzxyz", "15+25="]
    want = [plain_greedy(model, tok, p, 40) for p in prompts]
    forwards = {}
    for lookahead in (0, 1, 3):
        with fed(model) as shapes:
            assert greedy_generate(model, tok, prompts, max_new_tokens=40, batch_size=2, lookahead=lookahead) == want
        forwards[lookahead] = shapes
    # Every prompt is at least 6 tokens, so a forward 2-4 wide is a token and its drafts.
    drafted = {k: [w for _, w in shapes if 1 < w < 5] for k, shapes in forwards.items()}
    assert drafted[0] == [] and set(drafted[1]) == {2} and drafted[3]
    assert len(forwards[3]) < len(forwards[0]) and len(forwards[1]) < len(forwards[0])


@pytest.mark.parametrize("model_type", ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "llama",
                                        "mistral", "qwen2"])
def test_every_architecture_decodes_like_plain_greedy(donors_of, model_type):
    """Slots (rows written at their own ends under an explicit mask) and draft tokens depend on the
    model taking a custom 4D mask and positions with its cache; a model that rebuilt its own mask
    would let a row see another row's stale columns, and the text would drift."""
    path = donors_of(model_type, 1)[0]
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    prompts = ["12+7=", "rev:abc=", "abab", "a longer prompt than that=", "1"]
    want = [plain_greedy(model, tok, p, 16, eos=tok.eos_token_id) for p in prompts]
    assert greedy_generate(model, tok, prompts, max_new_tokens=16, batch_size=2, lookahead=2) == want


def test_a_sliding_window_cache_decodes_batch_by_batch(donors_of):
    """A sliding-window layer keeps a different span per length, so its rows cannot move into slots:
    each prefilled batch decodes to its end in transformers' own cache, one token per step."""
    path = donors_of("mistral", 1)[0]
    model = AutoModelForCausalLM.from_pretrained(path, sliding_window=6).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        assert not plain_layers(model(torch.tensor([[1, 5, 6]]), use_cache=True).past_key_values)
    prompts = ["12+7=", "rev:abc=", "abab"]
    want = [plain_greedy(model, tok, p, 12, eos=tok.eos_token_id) for p in prompts]
    with fed(model) as shapes:
        assert greedy_generate(model, tok, prompts, max_new_tokens=12, batch_size=2) == want
    assert all(w == 1 for _, w in shapes if w < 4)  # decoding steps are one token wide


# --- masked attention over grouped heads -------------------------------------------------------

def test_grouped_heads_are_set_on_cpu_only_and_restored():
    os.environ.pop("TRANSFORMERS_SDPA_FORCE_GQA", None)
    with grouped_kv_on_cpu(torch.device("cpu")):
        with grouped_kv_on_cpu("cpu"):  # nested (another probe on another thread)
            assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
        assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    with grouped_kv_on_cpu(torch.device("meta")):  # CUDA would fall back to the math kernel
        assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ


def test_grouped_heads_in_sdpa_change_no_number(donors_of):
    """qwen2's tiny donor has several query heads per key/value head: under a custom mask, its logits
    are bit for bit those transformers gives when it repeats the heads itself."""
    path = donors_of("qwen2", 1)[0]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10], [1, 11, 12, 13, 14, 15, 16]])
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()
    allowed[4:, 2:4] = False  # a tree: the last three tokens do not see two before them
    mask = torch.zeros(2, 1, 7, 7).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        repeated = model(input_ids=ids, attention_mask=mask).logits
        with grouped_kv_on_cpu("cpu"):
            grouped = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(grouped, repeated)
