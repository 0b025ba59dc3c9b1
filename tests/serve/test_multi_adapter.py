"""Many LoRA adapters over one base model (`lmforge serve BASE --adapter NAME=DIR`): rows of
different adapters share the engine's batches and each gives what its merged model gives;
the prefix cache keeps each adapter's keys and values apart; adapters load and unload at run
time through the authenticated admin routes, from under --adapter-root only."""

from __future__ import annotations

import copy
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from serve_helpers import KEY, Server

from lmforge.adapters import apply_adapter, apply_lora, save_adapter
from lmforge.config import ModelConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.infer.engine import Engine, Request
from lmforge.infer.prefix_cache import PrefixCache
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer
from lmforge.model.lora import LoraSettings, lora_layers
from lmforge.model_dir import save_model_dir
from lmforge.serve.command import build_app
from lmforge.serve.security import ApiKeys
from lmforge.serve.settings import ServeSettings

TEXT = ["Das Ticket INC-4411 betrifft den Login (SSO über Keycloak); bitte neu starten.",
        "部署 Kubernetes 集群时, 先检查 kubectl 的版本 (v1.29) 和 kubeconfig 路径。",
        "Order NL-20931 shipped on 2026-11-30 via DHL; tracking at https://nordlicht.example/t/20931",
        "def retry(fn, attempts=3):\n    for i in range(attempts):\n        try: return fn()\n        except IOError: pass"]
# Each adapter its own rank and target modules (and so its own linears in each block).
ADAPTERS = {"support-de": LoraSettings(r=4, alpha=8, targets="all-linear"),
            "ops-zh": LoraSettings(r=8, alpha=16, targets=["q_proj", "v_proj"]),
            "shipping": LoraSettings(r=2, alpha=4, targets=["o_proj", "down_proj"]),
            "code": LoraSettings(r=16, alpha=8, targets=["k_proj", "gate_proj", "up_proj"])}
BASE = "base"
# The native step adds B (A x) after the base matmul where the merged model multiplies by W + B A:
# the same numbers to float32 rounding.
LOGPROB_TOL = 2e-4


def _tokenizer():
    return train_tokenizer(TEXT * 10, vocab_size=400)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The base model directory and an adapter directory per ADAPTERS entry (PEFT layout, random B)."""
    root = tmp_path_factory.mktemp("multi")
    tokenizer = _tokenizer()
    cfg = ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, context=192,
                      vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    base = Transformer(cfg)
    base.reset_parameters(seed=0)
    base_dir = save_model_dir(base, tokenizer, root / "base")
    (root / "adapters").mkdir()
    out = {}
    for i, (name, settings) in enumerate(ADAPTERS.items()):
        model = apply_lora(copy.deepcopy(base), settings)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                for b in layer.lora_B:
                    b.copy_(torch.randn(b.shape, generator=g) * 0.5)
        out[name] = save_adapter(model, root / "adapters" / name, base=str(base_dir))
    return base_dir, out


def _merged(base_dir, adapter_dir):
    import lmforge

    m = lmforge.load(base_dir)
    if adapter_dir is not None:
        apply_adapter(m, adapter_dir, merge=True)
    return m


def _requests(tokenizer, model: str | None, texts: list[str], max_new: int = 10, **kw) -> list[Request]:
    return [Request(tokenizer.encode(t), SamplingParams(max_new_tokens=max_new), logprobs=0, adapter=model, **kw)
            for t in texts]


def _mixed(texts):
    """Every adapter and the base, two prompts each, interleaved: one batch of 10 rows."""
    return [(name, text) for text in texts[:2] for name in [*ADAPTERS, None]]


def _served_engine(dirs, native: bool, prefix_cache=None) -> Engine:
    import lmforge

    from lmforge.serve.adapters_registry import AdapterRegistry

    base_dir, adapters = dirs
    m = lmforge.load(base_dir)
    engine = Engine(m.model, m.tokenizer, native=native, prefix_cache=prefix_cache)
    registry = AdapterRegistry(engine, BASE, m)
    for name, path in adapters.items():
        registry.load(name, path)
    return engine


def _reference(dirs, rows, native: bool) -> list:
    """What each row's merged model gives (the base for None), one engine per model."""
    base_dir, adapters = dirs
    out = [None] * len(rows)
    for name in [*ADAPTERS, None]:
        m = _merged(base_dir, adapters.get(name))
        picked = [i for i, (n, _) in enumerate(rows) if n == name]
        with Engine(m.model, m.tokenizer, native=native) as engine:
            results = engine.generate([r for i in picked for r in _requests(m.tokenizer, None, [rows[i][1]])], 120)
        for i, res in zip(picked, results):
            out[i] = res
    return out


def _same(got, want) -> None:
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    worst = max(abs(a.logprob - b.logprob) for g, w in zip(got, want) for a, b in zip(g.tokens, w.tokens))
    assert worst < LOGPROB_TOL


@pytest.mark.parametrize("native", [True, False], ids=["native", "pytorch"])
def test_a_mixed_batch_of_four_adapters_and_the_base_equals_each_merged_model(dirs, native):
    # Short prompts ride in the native step; the long one is prefilled by PyTorch (hooks add the updates).
    texts = [TEXT[1], TEXT[3] * 4]
    rows = _mixed(texts)
    engine = _served_engine(dirs, native)
    assert (engine.native is not None) == native
    with engine:
        got = engine.generate([_requests(engine.tokenizer, n, [t])[0] for n, t in rows], 120)
    want = _reference(dirs, rows, native)
    _same(got, want)
    base_tokens = {t: r.token_ids for (n, t), r in zip(rows, want) if n is None}
    differ = sum(r.token_ids != base_tokens[t] for (n, t), r in zip(rows, want) if n is not None)
    assert differ >= 6  # the adapters change what the model says (the comparison is not base vs base)


def test_the_prefix_cache_keeps_each_adapters_keys_and_values_apart(dirs):
    prompt = TEXT[2] + " " + TEXT[0]  # several 16-token blocks
    cache = PrefixCache(64 << 20)
    engine = _served_engine(dirs, True, cache)
    with engine:
        tok = engine.tokenizer
        first = engine.generate(_requests(tok, None, [prompt]), 60)
        hits_before = cache.stats.hit_tokens
        got = engine.generate(_requests(tok, "ops-zh", [prompt]), 60)  # base KV cached for these very tokens
        assert cache.stats.hit_tokens == hits_before  # not reused across adapters
        again = engine.generate(_requests(tok, "ops-zh", [prompt]), 60)
        assert cache.stats.hit_tokens > hits_before  # reused within one adapter
        base_again = engine.generate(_requests(tok, None, [prompt]), 60)
    want = _reference(dirs, [("ops-zh", prompt)], True)
    _same(got, want)
    _same(again, want)
    assert base_again[0].token_ids == first[0].token_ids != got[0].token_ids


def test_echo_logprobs_and_speculative_decoding_with_an_adapter_equal_the_merged_model(dirs):
    from lmforge.infer.speculative import Speculator

    base_dir, adapters = dirs
    merged = _merged(base_dir, adapters["support-de"])
    prompt = TEXT[0] + " " + TEXT[0]  # repeats itself: prompt lookup finds drafts
    engine = _served_engine(dirs, True)
    engine.speculator = Speculator.ngram(4)
    with engine, Engine(merged.model, merged.tokenizer) as reference:
        tok = engine.tokenizer
        echo = _requests(tok, "support-de", [prompt], max_new=4, prompt_logprobs=True)
        got, want = engine.generate(echo, 60)[0], reference.generate(_requests(tok, None, [prompt], 4, prompt_logprobs=True), 60)[0]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(got.prompt[1:], want.prompt[1:])) < LOGPROB_TOL
        spec = engine.generate(_requests(tok, "support-de", [prompt], max_new=30), 60)
        plain = reference.generate(_requests(tok, None, [prompt], max_new=30), 60)
    assert engine.speculator.stats.steps > 0  # the lone adapter request was verified in multi-token steps
    _same(spec, plain)


# ----------------------------------------------------------------------------- over HTTP

@pytest.fixture(scope="module")
def server(dirs, tmp_path_factory):
    base_dir, adapters = dirs
    settings = ServeSettings(model_name=BASE, api_keys=ApiKeys([KEY]))
    app = build_app(base_dir, settings, adapters=list(adapters.items()),
                    adapter_root=next(iter(adapters.values())).parent)
    with Server(app) as s:
        yield s


def _post(url: str, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=120)


def _complete(url: str, model: str, prompt: str, stream: bool) -> tuple[str, list[float]]:
    body = {"model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 0, "stream": stream}
    if not stream:
        r = _post(url, "/v1/completions", body)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        choice = r.json()["choices"][0]
        return choice["text"], choice["logprobs"]["token_logprobs"]
    text, logprobs = "", []
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert chunk["model"] == model
                text += chunk["choices"][0]["text"]
                logprobs += (chunk["choices"][0]["logprobs"] or {}).get("token_logprobs", [])
    return text, logprobs


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_http_mixed_requests_equal_the_merged_models(server, dirs, stream):
    rows = _mixed([TEXT[0], TEXT[2]])
    with ThreadPoolExecutor(len(rows)) as pool:  # at once: they share the engine's batches
        got = list(pool.map(lambda r: _complete(server.url, r[0] or BASE, r[1], stream), rows))
    want = _reference(dirs, rows, True)
    tok = _tokenizer()
    for (text, logprobs), res in zip(got, want):
        assert text == tok.decode(res.token_ids)
        assert max(abs(a - b.logprob) for a, b in zip(logprobs, res.tokens)) < LOGPROB_TOL


def test_models_lists_the_base_and_its_adapters(server):
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    data = r.json()["data"]
    assert [m["id"] for m in data] == [BASE, *ADAPTERS]
    assert all(m["parent"] == BASE for m in data[1:]) and "parent" not in data[0]


def test_an_unknown_model_is_openais_404(server):
    r = _post(server.url, "/v1/chat/completions", {"model": "support-fr", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and "support-de" in r.json()["error"]["message"]


def test_chat_with_an_adapter_names_it(server):
    r = _post(server.url, "/v1/chat/completions", {"model": "code", "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": "重试 retry?"}]})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "code"


def _admin_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert "\n" not in message and all(w in message for w in words), message


def test_admin_loads_and_unloads_an_adapter_at_run_time(server, dirs):
    base_dir, adapters = dirs
    prompt = TEXT[2]
    _admin_error(_post(server.url, "/admin/adapters", {"name": "late", "path": "ops-zh"}, key=None), 401, "API key")
    r = _post(server.url, "/admin/adapters", {"name": "late", "path": "ops-zh"})  # relative to the root
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "late" and r.json()["rank"] == 8
    text, _ = _complete(server.url, "late", prompt, False)
    assert text == _complete(server.url, "ops-zh", prompt, False)[0]
    _admin_error(_post(server.url, "/admin/adapters", {"name": "late", "path": "ops-zh"}), 409, "taken")
    _admin_error(_post(server.url, "/admin/adapters", {"name": BASE, "path": "ops-zh"}), 409, "taken")
    r = httpx.delete(server.url + "/admin/adapters/late", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["deleted"] is True
    _admin_error(_post(server.url, "/v1/completions", {"model": "late", "prompt": prompt}), 404, "late")
    r = httpx.delete(server.url + "/admin/adapters/late", headers={"Authorization": f"Bearer {KEY}"})
    _admin_error(r, 404, "late")


def test_unloading_waits_for_the_requests_using_the_adapter(server):
    _post(server.url, "/admin/adapters", {"name": "slow", "path": "shipping"}).raise_for_status()
    engine = server.app.state.engine
    release, events = threading.Event(), []

    def on_event(ev):  # holds the engine at this request's first token until the unload is under way
        events.append(ev)
        release.wait(60)

    engine.submit(_requests(engine.tokenizer, "slow", [TEXT[0]], max_new=20)[0], on_event)
    answer: dict = {}
    unload = threading.Thread(target=lambda: answer.update(r=httpx.delete(
        server.url + "/admin/adapters/slow", headers={"Authorization": f"Bearer {KEY}"}, timeout=120)))
    unload.start()
    unload.join(0.5)
    assert unload.is_alive()  # waiting for the request
    # New requests for it are refused at once, while the running one goes on.
    _admin_error(_post(server.url, "/v1/completions", {"model": "slow", "prompt": "x"}), 404, "slow")
    release.set()
    unload.join(60)
    assert answer["r"].status_code == 200 and answer["r"].json()["waited_for_requests"] == 1
    assert events[-1].finish_reason == "length" and sum(len(ev.tokens) for ev in events) == 20


def test_admin_refuses_paths_outside_the_root_and_bad_adapters_and_keeps_serving(server, dirs, tmp_path):
    base_dir, adapters = dirs
    root = next(iter(adapters.values())).parent
    _admin_error(_post(server.url, "/admin/adapters", {"name": "x", "path": str(base_dir)}), 403, "outside")
    _admin_error(_post(server.url, "/admin/adapters", {"name": "x", "path": "../base"}), 403, "outside")
    (root / "link").symlink_to(tmp_path, target_is_directory=True)
    _admin_error(_post(server.url, "/admin/adapters", {"name": "x", "path": "link"}), 403, "outside")
    _admin_error(_post(server.url, "/admin/adapters", {"name": "x", "path": "missing"}), 400, "not a directory")
    _admin_error(_post(server.url, "/admin/adapters", {"name": "bad name!", "path": "code"}), 400, "name")
    # A corrupt weights file, a pickle-only adapter, and an adapter of another shape.
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((adapters["code"] / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + b"\0" * 64)
    _admin_error(_post(server.url, "/admin/adapters", {"name": "x", "path": "corrupt"}), 400, "corrupt")
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapters["code"] / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"PK\x03\x04")
    _admin_error(_post(server.url, "/admin/adapters", {"name": "x", "path": "pickled"}), 400, "safetensors")
    other = Transformer(ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=32, context=64,
                                    vocab_size=400))
    save_adapter(apply_lora(other, LoraSettings(r=4)), root / "other-shape", base="elsewhere")
    _admin_error(_post(server.url, "/admin/adapters", {"name": "x", "path": "other-shape"}), 400, "different base")
    # Still serving, base and adapters alike; nothing half-loaded.
    assert _complete(server.url, "code", TEXT[3], False)[0]
    assert "x" not in [m["id"] for m in httpx.get(server.url + "/v1/models",
                                                  headers={"Authorization": f"Bearer {KEY}"}).json()["data"]]


def test_without_an_adapter_root_run_time_loading_is_refused(dirs):
    base_dir, adapters = dirs
    app = build_app(base_dir, ServeSettings(model_name=BASE, api_keys=ApiKeys([KEY])))
    with Server(app) as s:
        _admin_error(_post(s.url, "/admin/adapters", {"name": "x", "path": str(adapters["code"])}), 403,
                     "--adapter-root")


def test_bad_adapter_flags_are_one_line(lmforge_main, dirs, tmp_path):
    base_dir, adapters = dirs
    code, _, err = lmforge_main("serve", base_dir, "--adapter", "=nothing", "--port", "0")
    assert code == 2 and "NAME=DIR" in err and "Traceback" not in err
    code, _, err = lmforge_main("serve", base_dir, "--adapter", f"a={tmp_path}", "--port", "0")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
