"""POST /v1/embeddings over real HTTP: the official `openai` client's `embeddings.create` (floats
and base64), the in-process embeddings they must equal, a model's saved pooling and allowed
dimensions, and hostile bodies (each a 4xx with one JSON error)."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import openai
import pytest
import torch
from serve_helpers import KEY, MODEL, Server

from lmforge.infer.engine import Engine
from lmforge.serve.app import create_app
from lmforge.serve.security import ApiKeys
from lmforge.serve.settings import ServeSettings
from lmforge.train.embed import Embedder

TEXTS = ["How do I resume an interrupted training run?", "ROMEO: But soft, what light through yonder window breaks?",
         "如何在 Linux 上安装 CUDA 驱动？", "The king is dead; long live the king! 数据清洗 pipeline 很重要。"]
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def pooled(tiny, tmp_path_factory):
    """A server whose model directory says: last-token pooling, 16 and 32 trained as shorter lengths."""
    folder = tmp_path_factory.mktemp("embed-model")
    (folder / "embedding.json").write_text(json.dumps({"pooling": "last", "dimensions": [16, 32]}))
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch=4)
    settings = ServeSettings(model_name=MODEL, api_keys=ApiKeys([KEY]), max_embedding_inputs=64)
    with Server(create_app(engine, settings, [folder])) as server:
        yield server


def openai_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_the_openai_client_gets_what_the_model_computes_in_process(server, client, tiny):
    model, tokenizer = tiny
    expected = Embedder(model, tokenizer, "mean").embed(TEXTS, batch_size=16)
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    packed = client.embeddings.create(model=MODEL, input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in floats.data] == [0, 1, 2, 3] and floats.model == MODEL
    for got in (floats, packed):
        vectors = torch.tensor([d.embedding for d in got.data])
        assert vectors.shape == (4, model.config.d_model)
        assert torch.allclose(vectors, expected, atol=1e-6)
        assert torch.allclose(vectors.norm(dim=1), torch.ones(4), atol=1e-5)
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(TEXTS))
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens
    # Different texts, different vectors: a constant answer would pass the checks above only by accident.
    assert (vectors @ vectors.T - torch.eye(4)).abs().max() < 0.999


def test_base64_is_little_endian_float32_of_the_same_numbers(http):
    floats = http.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS[2]}).json()
    packed = http.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS[2], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == pytest.approx(floats["data"][0]["embedding"], abs=0)  # the same float32 values


def test_token_ids_and_lists_of_them_embed_like_their_text(client, tiny):
    _, tokenizer = tiny
    ids = tokenizer.encode_batch(TEXTS[:2])
    by_text = client.embeddings.create(model=MODEL, input=TEXTS[:2], encoding_format="float").data
    one = client.embeddings.create(model=MODEL, input=ids[0], encoding_format="float").data
    both = client.embeddings.create(model=MODEL, input=ids, encoding_format="float").data
    assert len(one) == 1 and len(both) == 2
    assert one[0].embedding == pytest.approx(by_text[0].embedding, abs=1e-6)
    assert both[1].embedding == pytest.approx(by_text[1].embedding, abs=1e-6)


def test_a_vector_does_not_depend_on_its_batch(tiny):
    """Batched (padded, sorted by length) and alone agree: padding never reaches a real token."""
    model, tokenizer = tiny
    embed = Embedder(model, tokenizer, "mean")
    together = embed.embed(TEXTS * 5, batch_size=7)
    for i, text in enumerate(TEXTS):
        assert torch.allclose(together[i], embed.embed([text])[0], atol=1e-5)
        assert torch.allclose(together[i + 4], together[i], atol=1e-5)


def test_the_saved_pooling_and_dimensions_are_served(pooled, tiny):
    model, tokenizer = tiny
    client = openai_client(pooled)
    full = torch.tensor([d.embedding for d in client.embeddings.create(model=MODEL, input=TEXTS).data])
    assert torch.allclose(full, Embedder(model, tokenizer, "last").embed(TEXTS), atol=1e-6)
    assert not torch.allclose(full, Embedder(model, tokenizer, "mean").embed(TEXTS), atol=1e-3)
    short = torch.tensor([d.embedding for d in client.embeddings.create(model=MODEL, input=TEXTS, dimensions=16).data])
    assert short.shape == (4, 16)
    assert torch.allclose(short, torch.nn.functional.normalize(full[:, :16], dim=1), atol=1e-6)
    with pytest.raises(openai.BadRequestError, match="may be 16 or 32 or 64 long"):
        client.embeddings.create(model=MODEL, input=TEXTS, dimensions=20)


def test_dimensions_are_refused_where_the_model_was_not_trained_for_them(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input="hello", dimensions=32)
    assert info.value.body["param"] == "dimensions" and "64" in info.value.body["message"]
    assert len(client.embeddings.create(model=MODEL, input="hello", dimensions=64).data[0].embedding) == 64


@pytest.mark.parametrize("body, status, words", [
    ({"model": MODEL, "input": []}, 400, "the input list is empty"),
    ({"model": MODEL, "input": ""}, 400, "the input is empty"),
    ({"model": MODEL, "input": ["x"] * 10_000}, 400, "10000 inputs; this server takes at most 2048"),
    ({"model": MODEL, "input": [[1, 2], "mixed"]}, 400, "input"),
    ({"model": MODEL, "input": [[[1]]]}, 400, "input"),
    ({"model": MODEL, "input": [1, "2"]}, 400, "input"),
    ({"model": MODEL, "input": {"text": "a dict"}}, 400, "input"),
    ({"model": MODEL, "input": [None]}, 400, "input"),
    ({"model": MODEL, "input": [-1]}, 400, "input"),
    ({"model": MODEL, "input": [10**6]}, 400, "outside the vocabulary"),
    ({"model": MODEL, "input": [[]]}, 400, "input"),
    ({"model": MODEL}, 400, "input"),
    ({"model": MODEL, "input": "to be " * 400}, 400, "this server takes at most 127 tokens"),
    ({"model": MODEL, "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": MODEL, "input": "x", "dimensions": 0}, 400, "dimensions"),
    ({"model": MODEL, "input": "x", "dimensions": "64"}, 400, "dimensions"),
    ({"model": "another-model", "input": "x"}, 404, "does not exist"),
])
def test_hostile_bodies_get_one_json_error(http, body, status, words):
    r = http.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"]
    assert "\n" not in error["message"] and "Traceback" not in r.text


def test_a_huge_body_is_413_and_a_key_is_needed(server):
    huge = httpx.post(server.url + "/v1/embeddings", headers=AUTH, timeout=60,
                      json={"model": MODEL, "input": "数据" * 600_000})
    assert huge.status_code == 413 and "larger than" in huge.json()["error"]["message"]
    anonymous = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": "x"}, timeout=60)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"


def test_the_server_setting_bounds_the_inputs(pooled):
    r = httpx.post(pooled.url + "/v1/embeddings", headers=AUTH, json={"input": ["x"] * 65}, timeout=60)
    assert r.status_code == 400 and "at most 64" in r.json()["error"]["message"]
    assert len(httpx.post(pooled.url + "/v1/embeddings", headers=AUTH, json={"input": ["x"] * 64},
                          timeout=60).json()["data"]) == 64


def test_embedding_tokens_count_against_the_keys_token_rate(start_server):
    limited = start_server(tokens_per_minute=40)
    client = openai_client(limited)
    client.embeddings.create(model=MODEL, input=TEXTS[0])
    with pytest.raises(openai.RateLimitError, match="more than your limit"):
        client.embeddings.create(model=MODEL, input=TEXTS * 3)


def test_hooks_the_engine_puts_on_its_model_do_not_reach_the_embeddings(server, http, tiny):
    """The engine adds LoRA updates with forward hooks while it decodes adapter rows; the
    embeddings run beside it on the same weights without them."""
    model, tokenizer = tiny
    engine_model = server.app.state.engine.model
    embedder = server.app.state.embeddings.embedder
    assert embedder.model is not engine_model
    assert embedder.model.tok_emb.weight.data_ptr() == engine_model.tok_emb.weight.data_ptr()  # no weights copied
    before = http.post("/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "float"}).json()
    handle = engine_model.blocks[0].register_forward_hook(lambda module, inputs, out: out + 1.0)
    try:
        during = http.post("/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "float"}).json()
    finally:
        handle.remove()
    assert during["data"][0]["embedding"] == before["data"][0]["embedding"]
