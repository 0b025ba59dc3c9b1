"""lm-eval's `local-completions` model scoring and generating through the server, with the
server's own tokenizer (lm-eval's remote backend: /tokenizer_info, /tokenize, /detokenize)."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import KEY, MODEL

from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams

PAIRS = [("To be, or not", " to be, that is the question"), ("The king is", " dead; long live the king!"),
         ("ROMEO:", " But soft, what light"), ("Now is the winter", " of our discontent.")]


@pytest.fixture()
def lm(server):
    pytest.importorskip("lm_eval")
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(model=MODEL, base_url=server.url + "/v1/completions", tokenizer_backend="auto",
                               auth_token=KEY, header={"Authorization": f"Bearer {KEY}"}, max_length=128,
                               num_concurrent=2, max_retries=1)


def test_loglikelihoods_equal_the_models_own(lm, tiny):
    from lm_eval.api.instance import Instance

    model, tokenizer = tiny
    results = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)])
    for (context, continuation), (logprob, is_greedy) in zip(PAIRS, results):
        ids = tokenizer.encode(context + continuation)
        ctxlen = len(tokenizer.encode(context))
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
        expected = [lp[i - 1, ids[i]].item() for i in range(ctxlen, len(ids))]
        assert logprob == pytest.approx(sum(expected), abs=1e-3)
        assert is_greedy == all(lp[i - 1].argmax().item() == ids[i] for i in range(ctxlen, len(ids)))


def test_generate_until(lm, tiny):
    from lm_eval.api.instance import Instance

    model, tokenizer = tiny
    (text,) = lm.generate_until([Instance("generate_until", {}, ("To be", {"until": ["\n\n"], "max_gen_toks": 8}), 0)])
    expected = generate(model, tokenizer, ["To be"], SamplingParams(max_new_tokens=8, stop=["\n\n"]))[0].text
    assert text == expected
