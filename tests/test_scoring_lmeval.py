"""lm-evaluation-harness itself (HFLM on the same model object and tokenizer) gives the numbers
and texts our scorer gives, request for request: the token sequences are lm-eval's."""

import pytest
from tiny_models import make_donor

from surgeon.probes.generation import greedy_generate
from surgeon.probes.scoring import MIN_SHARED_PREFIX, loglikelihoods

lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")
from lm_eval.api.instance import Instance

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CORPUS = ["Question: what is two plus two?\nAnswer: four", "The cat sat on the mat. The dog sat on the log.",
          "Paris is the capital of France.", "1 + 2 = 3, 10 + 20 = 30, 12 + 7 = 19"] * 10


def bpe_tokenizer(adds_bos: bool):
    """A small byte-level BPE (spaces merge into the next word, as GPT-2's do), trained here.
    adds_bos: the tokenizer puts <bos> first on its own, as Llama's does; otherwise it has no
    bos at all and an empty context becomes eos."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<bos>", "<eos>"],
                                                        show_progress=False))
    if not adds_bos:
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    # the tokenizer's size, so every id the model picks decodes to text
    path = make_donor(tmp_path_factory.mktemp("lmeval") / "llama", "llama", seed=0, vocab_size=len(bpe_tokenizer(True)))
    return AutoModelForCausalLM.from_pretrained(path).eval()


QUESTION = "Question: what is two plus two?\nAnswer:"
REQUESTS = [
    (QUESTION, " four"), (QUESTION, " two"), (QUESTION, " the cat sat on the mat"),  # shared context
    (QUESTION + " ", "four"),  # the trailing space moves to the continuation: " four" again
    ("The cat sat on the", " mat."), ("The cat sat on the", " log"), ("The cat sat on", " the"),
    ("", "Paris is the capital"),  # empty context: bos (or eos)
    ("Paris is the capital of France. " * 6 + "The dog", " sat on the log."),  # beyond 64 tokens
    ("1 + 2 = 3, 10 + 20 =", " 30"), ("1 + 2 = 3, 10 + 20 = 30, 12 + 7 =", " 19"),
    # one context is a prefix of another as a string, not as tokens (" ca" is not " cat")
    ("The cat sat on the mat. The dog sat on the mat. The ca", "t sat on the mat."),
    ("The cat sat on the mat. The dog sat on the mat. The cat", " sat on the mat."),
]
PREAMBLE = "Paris is the capital of France. The dog sat on the log.\n\n"  # a k-shot preamble's part


@pytest.mark.parametrize("shared", [False, True], ids=["mixed", "shared-preamble"])
@pytest.mark.parametrize("adds_bos", [True, False], ids=["bos-adding", "no-bos"])
def test_loglikelihoods_equal_lm_evals(model, adds_bos, shared):
    tok = bpe_tokenizer(adds_bos)
    preamble = PREAMBLE if shared else ""
    requests = list(REQUESTS)
    if adds_bos:
        requests.append(("<bos>" + QUESTION, " four"))  # a context that brings its own bos gets no second
    if shared:  # every context starts with the preamble (and none is long enough to lose it)
        requests = [(preamble + c.removeprefix("<bos>"), x) for c, x in requests if len(c) < 100]
    greedy_text = greedy_generate(model, tok, [preamble + QUESTION], max_new_tokens=3)[0]
    requests.append((preamble + QUESTION, greedy_text))  # lm-eval's is_greedy must say True here
    lm = lm_eval_hf.HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    want = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=r, idx=0) for r in requests],
                            disable_tqdm=True)
    assert want[-1][1]
    for batch_size, max_batch_tokens in ((16, None), (3, 16)):
        shapes = []
        hook = model.register_forward_pre_hook(lambda _m, _a, kw, seen=shapes: seen.append(kw["input_ids"].shape),
                                               with_kwargs=True)
        try:
            got = loglikelihoods(model, tok, requests, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
        finally:
            hook.remove()
        if shared:  # the preamble's tokens ran once, alone, and then never again
            assert shapes[0][0] == 1 and shapes[0][1] >= MIN_SHARED_PREFIX
            contexts = {c for c, _ in requests}
            assert sum(rows * width for rows, width in shapes) < sum(len(tok(c)["input_ids"]) for c in contexts)
        for r, g, (logprob, greedy) in zip(requests, got, want, strict=True):
            assert g.logprob == pytest.approx(logprob, abs=1e-4), r
            assert g.greedy == greedy, r


@pytest.mark.parametrize("adds_bos", [True, False], ids=["bos-adding", "no-bos"])
def test_greedy_generate_equals_lm_evals_generate_until(model, adds_bos):
    tok = bpe_tokenizer(adds_bos)
    contexts = [QUESTION, "The cat sat on the", "Paris is the capital of France. " * 8, "1 + 2 =", "The"]
    raw = greedy_generate(model, tok, contexts, max_new_tokens=12)
    # stop strings the model really produces, so some texts are cut and others are not (an empty
    # one would stop lm-eval's whole batch after one token)
    texts = [r for r in raw if len(r) >= 4]
    until = [texts[0][1:3], texts[1][2]]
    lm = lm_eval_hf.HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    gen = {"until": until, "max_gen_toks": 12, "do_sample": False}
    want = lm.generate_until([Instance(request_type="generate_until", doc={}, arguments=(c, gen), idx=0)
                              for c in contexts], disable_tqdm=True)
    assert want != raw
    assert greedy_generate(model, tok, contexts, until=until, max_new_tokens=12, batch_size=2) == want
