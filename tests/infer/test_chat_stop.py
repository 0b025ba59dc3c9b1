"""A chat reply ends at the end-of-turn token of the model's chat template, by id: in
`lmforge chat`, in `generate(..., stop_token_ids=...)` and in the server, through one function
(`end_of_turn_ids`)."""

from __future__ import annotations

import pytest
import torch

from lmforge.data.chat_template import end_of_turn_ids
from lmforge.data.tokenizer import TextTokenizer, train_tokenizer
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer

TEXT = ["Good day to you, and a good day again.", "user assistant system hello world yes no"] * 20

LLAMA3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
PHI3 = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
           "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
USER_ONLY = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ raise_exception('no assistant turns') }}"
             "{% endif %}{{ m['content'] }}{% endfor %}")


def tokenizer_with(template: str | None, specials: list[str] = (), **config) -> TextTokenizer:
    tok = train_tokenizer(TEXT, 400)
    tok.backend.add_special_tokens(list(specials))
    return TextTokenizer(tok.backend, {**tok.config, "chat_template": template, **config})


def test_end_of_turn_is_read_off_each_template():
    chatml = tokenizer_with(None)  # lmforge's default: ChatML
    assert end_of_turn_ids(chatml) == [chatml.backend.token_to_id("<|im_end|>")]
    llama3 = tokenizer_with(LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    assert end_of_turn_ids(llama3) == [llama3.backend.token_to_id("<|eot_id|>")]
    phi3 = tokenizer_with(PHI3, ["<|user|>", "<|assistant|>", "<|end|>"])
    assert end_of_turn_ids(phi3) == [phi3.backend.token_to_id("<|end|>")]
    mistral = tokenizer_with(MISTRAL, ["<s>", "</s>"], bos_token="<s>", eos_token="</s>")
    assert end_of_turn_ids(mistral) == [mistral.eos_id] == [mistral.backend.token_to_id("</s>")]
    assert end_of_turn_ids(tokenizer_with(PLAIN)) == []  # a turn ends in plain text: nothing to stop on
    assert end_of_turn_ids(tokenizer_with(USER_ONLY)) == []  # the template refuses the probe


def chain_model(tokenizer: TextTokenizer, chain: dict[int, int]) -> Transformer:
    """A llama-family model whose greedy next token depends only on the current one: `chain[a]`
    follows `a`. Its blocks add nothing (zero output projections), so the last hidden state is
    the current token's normalized embedding, and the LM head's row for `chain[a]` points at it."""
    from lmforge.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, n_layer=1, n_head=4, n_kv_head=2,
                      d_model=64, context=128, tie_embeddings=False)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.normal_()
        for block in model.blocks:
            block.attn.proj.weight.zero_()
            block.mlp.down.weight.zero_()
        model.lm_head.weight.zero_()
        for a, b in chain.items():
            e = model.tok_emb.weight[a]
            model.lm_head.weight[b] += 2.0 * e / e.norm()
    return model


def chatty(tokenizer: TextTokenizer, prompt_ids: list[int]) -> tuple[Transformer, list[int]]:
    """After the prompt: "Good day", the end-of-turn token, then " again" for ever (what a model
    that runs on past its turn does)."""
    good, day, again = (tokenizer.encode(w)[0] for w in ("Good", " day", " again"))
    turn_end = end_of_turn_ids(tokenizer)[0]
    chain = {prompt_ids[-1]: good, good: day, day: turn_end, turn_end: again, again: again}
    assert len({prompt_ids[-1], good, day, turn_end, again}) == 5
    return chain_model(tokenizer, chain), [good, day]


@pytest.mark.parametrize("template", [None, LLAMA3], ids=["chatml", "llama3"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "reference"])
def test_generation_stops_on_the_end_of_turn_token(template, native):
    tok = tokenizer_with(template, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"] if template else [])
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello"}]))
    model, reply = chatty(tok, prompt)
    params = SamplingParams(max_new_tokens=20)
    (runaway,) = generate(model, tok, [prompt], params, native=native)
    assert runaway.text.startswith("Good day again again") and runaway.finish_reason == "length"
    (done,) = generate(model, tok, [prompt], params, native=native, stop_token_ids=end_of_turn_ids(tok))
    assert done.token_ids == reply and done.text == "Good day" and done.finish_reason == "stop"


@pytest.mark.slow
def test_chat_command_ends_the_reply_at_the_end_of_turn(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from lmforge.model_dir import save_model_dir

    tok = tokenizer_with(None)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello"}]))
    model, _ = chatty(tok, prompt)
    folder = save_model_dir(model, tok, tmp_path / "chatty")
    lmforge = Path(sys.executable).parent / "lmforge"
    proc = subprocess.run([str(lmforge), "chat", str(folder), "--temperature", "0", "--max-tokens", "30"],
                          input="hello\n", capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_COLOR": "1"})
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    replies = [line.split("model> ", 1)[1] for line in out.splitlines() if "model> " in line]
    assert replies == ["Good day"], out


def test_the_server_ends_a_chat_reply_at_the_template_end_of_turn():
    """A Llama-3-style template ends turns with <|eot_id|>, not ChatML's <|im_end|>."""
    from fastapi.testclient import TestClient

    from lmforge.infer.engine import Engine
    from lmforge.serve.app import create_app
    from lmforge.serve.settings import ServeSettings

    tok = tokenizer_with(LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello"}]))
    model, _ = chatty(tok, prompt)
    app = create_app(Engine(model, tok, max_batch=2, max_queue=4), ServeSettings(model_name="chatty"))
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"model": "chatty", "max_tokens": 20, "temperature": 0,
                                                       "messages": [{"role": "user", "content": "hello"}]})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "Good day" and choice["finish_reason"] == "stop"
