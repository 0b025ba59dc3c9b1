"""The prefix cache behind the HTTP server: 16 concurrent clients sharing a system prompt get the
same completions with `--prefix-cache-mb` as with `--no-prefix-cache`, and /metrics shows the hits."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from serve_helpers import KEY, Server

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.model import Transformer
from lmforge.model_dir import save_model_dir
from lmforge.serve.command import build_app
from lmforge.serve.security import ApiKeys
from lmforge.serve.settings import ServeSettings

SYSTEM = ("System: You are the help desk of Nordlicht Outdoor GmbH. Answer briefly and politely; quote order "
          "numbers exactly; for returns link https://nordlicht.example/returns; opening hours Mon-Fri 9-18 CET. "
          "如果客户用中文提问, 请用中文回答 (keep product names like GORE-TEX in English).\n")
QUESTIONS = [f"User: {q}\nAssistant:" for q in (
    "Where is my order NL-20931?", "Do the Fjell boots run small?", "Can I return a used tent?",
    "我的订单 NL-77120 什么时候到?", "Is the GORE-TEX jacket machine washable?", "Do you ship to Norway?",
    "What is the warranty on sleeping bags?", "Can I pay by invoice?", "How do I reset my password?",
    "Is there a student discount?", "Where are you based?", "Do you sell gift cards?",
    "My zip broke after a week.", "请问有实体店吗?", "Can I change the delivery address?", "Are dogs allowed in the shop?")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = train_tokenizer([SYSTEM, *QUESTIONS] * 8, vocab_size=600)
    cfg = ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, context=256,
                      vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    return save_model_dir(Transformer(cfg), tokenizer, tmp_path_factory.mktemp("models") / "helpdesk")


def _server(model_dir, prefix_cache_mb: float) -> Server:
    settings = ServeSettings(model_name="helpdesk", api_keys=ApiKeys([KEY]), prefix_cache_mb=prefix_cache_mb)
    return Server(build_app(model_dir, settings))


def _ask_all(url: str, system: str, rounds: int = 2) -> list[list[tuple]]:
    """Each round: 16 clients at once, every other one sampling with its own seed."""

    def ask(i: int) -> tuple:
        body = {"model": "helpdesk", "prompt": system + QUESTIONS[i], "max_tokens": 12, "logprobs": 1,
                "temperature": 0.8 if i % 2 else 0.0, **({"seed": 100 + i} if i % 2 else {})}
        r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["text"], choice["finish_reason"], choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"]

    out = []
    with ThreadPoolExecutor(16) as pool:
        for _ in range(rounds):
            out.append(list(pool.map(ask, range(len(QUESTIONS)))))
    return out


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else float("nan")


def _same(on, off) -> None:
    for round_on, round_off in zip(on, off, strict=True):
        for (text, why, toks, lps), (text_off, why_off, toks_off, lps_off) in zip(round_on, round_off, strict=True):
            assert (text, why, toks) == (text_off, why_off, toks_off)
            torch.testing.assert_close(torch.tensor(lps), torch.tensor(lps_off), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("system_tokens", ["long", "short"])
def test_sixteen_concurrent_clients_same_with_the_cache_on_and_off(model_dir, system_tokens):
    # long: prompts past the native step's 64 tokens, prefilled by PyTorch; short: fed in the step
    system = SYSTEM if system_tokens == "long" else SYSTEM[:60]
    with _server(model_dir, 0) as off_server:
        off = _ask_all(off_server.url, system)
        assert "lmforge_prefix_cache_hit_rate" not in httpx.get(off_server.url + "/metrics").text
    with _server(model_dir, 64) as on_server:
        on = _ask_all(on_server.url, system)
        hit_rate = _metric(on_server.url, "lmforge_prefix_cache_hit_rate")
        hits = _metric(on_server.url, "lmforge_prefix_cache_hit_tokens")
    _same(on, off)
    assert hits > 0 and 0.3 < hit_rate < 1.0


@pytest.mark.slow
def test_a_tiny_budget_evicts_and_stays_the_same(model_dir):
    with _server(model_dir, 0) as off_server:
        off = _ask_all(off_server.url, SYSTEM, rounds=1)
    with _server(model_dir, 0.02) as on_server:  # ~20 KB: three or four blocks of this model
        on = _ask_all(on_server.url, SYSTEM, rounds=1)
        cache = on_server.app.state.engine.prefix_cache
        assert cache.stats.evicted_blocks > 0 and cache.used_bytes <= 0.02 * 2**20
    _same(on, off)


def test_bad_prefix_cache_budget_is_one_line(lmforge_main, model_dir):
    code, _, err = lmforge_main("serve", model_dir, "--prefix-cache-mb", "-1")
    assert code == 2
    assert "--prefix-cache-mb must be 0 or more" in err and "Traceback" not in err


def test_prompt_lookup_server_gives_the_same_greedy_completions(model_dir):
    prompt = SYSTEM + "Repeat the first sentence exactly.\n" + SYSTEM[:80]

    def complete(url: str) -> dict:
        r = httpx.post(url + "/v1/completions", json={"model": "helpdesk", "prompt": prompt, "max_tokens": 24, "temperature": 0},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    settings = ServeSettings(model_name="helpdesk", api_keys=ApiKeys([KEY]), speculative="ngram", speculative_tokens=4)
    with Server(build_app(model_dir, settings)) as spec_server:
        spec = complete(spec_server.url)
        rate = _metric(spec_server.url, "lmforge_speculative_acceptance_rate")
        proposed = _metric(spec_server.url, "lmforge_speculative_draft_tokens")
    with _server(model_dir, 0) as plain_server:
        plain = complete(plain_server.url)
    assert (spec["text"], spec["finish_reason"]) == (plain["text"], plain["finish_reason"])
    assert proposed > 0 and 0 <= rate <= 1


@pytest.mark.parametrize("args, message", [
    (["--speculative", "medusa"], "--speculative 'medusa' is not known"),
    (["--speculative", "ngram", "--speculative-tokens", "0"], "--speculative-tokens must be at least 1"),
    (["--speculative", "ngram", "--draft", "."], "not both"),
])
def test_bad_speculative_flags_are_one_line(lmforge_main, model_dir, args, message):
    code, _, err = lmforge_main("serve", model_dir, *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_a_draft_with_another_tokenizer_is_refused(lmforge_main, model_dir, tmp_path):
    tokenizer = train_tokenizer(["a different corpus of words entirely"] * 20, vocab_size=300)
    cfg = ModelConfig(family="llama", n_layer=1, n_head=2, n_kv_head=1, d_model=32, context=128,
                      vocab_size=tokenizer.vocab_size)
    draft = save_model_dir(Transformer(cfg), tokenizer, tmp_path / "draft")
    code, _, err = lmforge_main("serve", model_dir, "--draft", draft)
    assert code == 2 and "another tokenizer" in err and "Traceback" not in err
