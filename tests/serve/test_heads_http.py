"""POST /v1/classify and /v1/tag over real HTTP, for heads `lmforge finetune` trained here on one
random bilingual base: a sentiment classifier as a LoRA adapter (head in adapter/, served with
--adapter) and a Chinese + English NER tagger fully fine-tuned (head in model/). Answers equal
what `lmforge classify` / `lmforge tag` compute; entity offsets point into the text, Chinese too."""

from __future__ import annotations

import random

import httpx
import openai
import pytest
from serve_helpers import KEY, Server

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import train_tokenizer
from lmforge.model import Transformer
from lmforge.model_dir import save_model_dir
from lmforge.serve.command import build_app
from lmforge.serve.security import ApiKeys
from lmforge.serve.settings import ServeSettings
from lmforge.train.classify import load_task_model
from lmforge.train.finetune import finetune, load_finetune_config
from lmforge.train.labeling import classification, tag_text

AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD, BAD = ["great", "excellent", "wonderful", "好用", "满意", "推荐"], ["awful", "broken", "terrible", "很差", "失望", "退货"]
FILLER = ["the", "laptop", "screen", "battery", "was", "这个", "手机", "的", "屏幕", "电池", "really", "我", "觉得"]
PEOPLE, PLACES = ["张伟", "李娜", "Alice", "Bob"], ["北京", "上海", "深圳", "Paris"]
CLAUSES = ["{P}去了{L}", "{P}在{L}部署模型", "{P}和{P}讨论 GPU 训练", "{L}的数据中心", "我们见到了{P}", "meeting {P} in {L}"]


def sentiment_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choice(["positive", "negative"])
        words = rng.choices(FILLER, k=rng.randint(2, 5))
        words.insert(rng.randint(0, len(words)), rng.choice(GOOD if label == "positive" else BAD))
        rows.append({"id": f"review-{seed}-{i}", "text": " ".join(words), "label": label})
    return rows


def ner_rows(n: int, seed: int) -> list[dict]:
    """Chinese characters one word each, English words, BIO tags (as NER corpora hold them)."""
    from lmforge.data.words import split_words

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words, tags = [], []
        sentence = "，".join(rng.sample(CLAUSES, rng.randint(1, 2))) + "。"
        for piece in sentence.replace("{", "|{").replace("}", "}|").split("|"):
            if piece in ("{P}", "{L}"):
                kind, names = ("PER", PEOPLE) if piece == "{P}" else ("LOC", PLACES)
                found = [w for w, _, _ in split_words(rng.choice(names))]
                words += found
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(found) - 1)
            else:
                found = [w for w, _, _ in split_words(piece)]
                words += found
                tags += ["O"] * len(found)
        rows.append({"tokens": words, "tags": tags})
    return rows


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def train_head(root, base, task: str, rows, val, over: dict):
    raw = {"base": str(base), "task": task, "method": over.pop("method", "full"),
           "data": {"train": str(write_jsonl(root / f"{task}.jsonl", rows)),
                    "val": str(write_jsonl(root / f"{task}-val.jsonl", val))},
           "train": {"batch_size": 16, "lr": 3e-3, "max_steps": 80, "warmup": 5, "checkpoint_every": 1000,
                     "log_every": 20, "device": "cpu", "seed": 0, **over},
           "eval": {"every": 1000, "batches": 50}, "run": {"name": task, "out": str(root / "runs")}}
    return finetune(load_finetune_config(None, raw), progress=False, log=lambda s: None)


pytestmark = pytest.mark.slow  # the module trains two heads first


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base dir, classify adapter dir, tag model dir), fine-tuned here (~40 s on a quiet machine)."""
    root = tmp_path_factory.mktemp("heads-http")
    corpus = [" ".join(GOOD + BAD + FILLER), "".join(PEOPLE + PLACES + CLAUSES), "GPU 训练 部署模型 数据中心。，"] * 30
    tok = train_tokenizer(corpus, 400)
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                      context=64, init_std=0.2)
    model = Transformer(cfg)
    model.reset_parameters(seed=0)
    base = save_model_dir(model, tok, root / "base")
    classify = train_head(root, base, "classify", sentiment_rows(400, 0), sentiment_rows(100, 1),
                          {"method": "lora", "lr": 1e-2, "max_steps": 150})
    tag = train_head(root, base, "tag", ner_rows(400, 0), ner_rows(60, 1), {"max_steps": 100})
    # LoRA on a random base learns slower than full fine-tuning; these are what the tests below lean on.
    assert classify.metrics["accuracy"] > 0.75 and tag.metrics["entity_f1"] > 0.9, (classify.metrics, tag.metrics)
    return base, classify.output, tag.output


def serve(model_dir, adapter=None, **settings) -> Server:
    settings = {"model_name": "heads", "api_keys": ApiKeys([KEY]), **settings}
    return Server(build_app(model_dir, ServeSettings(**settings), adapter=adapter))


@pytest.fixture(scope="module")
def classify_server(trained):
    base, adapter, _ = trained
    with serve(base, adapter=adapter, max_embedding_inputs=100) as server:
        yield server


@pytest.fixture(scope="module")
def tag_server(trained):
    with serve(trained[2], max_embedding_inputs=100) as server:
        yield server


def post(server, path: str, body: dict, auth=True) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=AUTH if auth else {}, timeout=60)


def test_classify_answers_what_lmforge_classify_computes(trained, classify_server):
    tuned = load_task_model(trained[1])
    texts = [r["text"] for r in sentiment_rows(40, 7)]
    r = post(classify_server, "/v1/classify", {"model": "heads", "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = [classification(tuned.labels, p) for p in tuned.probabilities(texts)]
    assert [d["label"] for d in body["data"]] == [e["label"] for e in expected]
    for got, want in zip(body["data"], expected):  # batched otherwise than the command: float rounding
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=2e-6)
        assert got["probability"] == pytest.approx(want["probability"], abs=2e-6)
    assert [d["index"] for d in body["data"]] == list(range(40))
    gold = [r["label"] for r in sentiment_rows(40, 7)]
    assert sum(d["label"] == g for d, g in zip(body["data"], gold)) >= 30  # the head learned the task
    tokens = sum(len(ids) for ids in tuned.loaded.tokenizer.encode_batch(texts))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens} and body["model"] == "heads"


def test_classify_through_the_openai_client_and_token_ids(trained, classify_server):
    client = openai.OpenAI(base_url=classify_server.url + "/v1", api_key=KEY, max_retries=0)
    one = client.post("/classify", body={"model": "heads", "input": "这个 手机 真的 很差 失望"}, cast_to=object)
    assert one["data"][0]["label"] == "negative" and set(one["data"][0]["probabilities"]) == {"negative", "positive"}
    ids = load_task_model(trained[1]).loaded.tokenizer.encode("这个 手机 真的 很差 失望")
    by_ids = post(classify_server, "/v1/classify", {"input": [ids]}).json()["data"][0]
    assert by_ids["probabilities"] == one["data"][0]["probabilities"]


def test_tag_gives_entities_with_character_offsets_in_chinese_and_english(trained, tag_server):
    tuned = load_task_model(trained[2])
    texts = ["张伟去了北京，李娜在上海部署模型。", "meeting Alice in Paris", "我们见到了Bob。"]
    r = post(tag_server, "/v1/tag", {"model": "heads", "input": texts})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [{k: v for k, v in d.items() if k != "index"} for d in data] == [tag_text(tuned, t) for t in texts]
    found = [[(e["type"], e["text"]) for e in d["entities"]] for d in data]
    assert found[0] == [("PER", "张伟"), ("LOC", "北京"), ("PER", "李娜"), ("LOC", "上海")]
    assert found[1] == [("PER", "Alice"), ("LOC", "Paris")]
    assert found[2] == [("PER", "Bob")]
    for d, text in zip(data, texts):
        for e in d["entities"]:
            assert text[e["start"]:e["end"]] == e["text"]
    single = post(tag_server, "/v1/tag", {"input": texts[0]}).json()["data"]
    assert len(single) == 1 and single[0]["entities"] == data[0]["entities"]


def test_a_route_without_its_head_is_404_naming_the_one_that_serves(classify_server, tag_server, server):
    r = post(classify_server, "/v1/tag", {"input": "张伟去了北京"})
    assert r.status_code == 404 and "served at /v1/classify" in r.json()["error"]["message"]
    r = post(tag_server, "/v1/classify", {"input": "great"})
    assert r.status_code == 404 and "served at /v1/tag" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/classify", json={"input": "great"}, headers=AUTH, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_task_head"
    assert "lmforge finetune --task classify" in r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/tag"])
@pytest.mark.parametrize("body, words", [
    ({"input": []}, "the input list is empty"),
    ({"input": ""}, "the input is empty"),
    ({"input": ["x"] * 10_000}, "10000 inputs; this server takes at most 100"),
    ({"input": [["nested"]]}, "input"),
    ({"input": {"text": "x"}}, "input"),
    ({"input": "很好 " * 200}, "this server takes at most 63 tokens"),
    ({"input": "x", "model": "other"}, "does not exist"),
])
def test_bad_bodies_are_one_json_error(classify_server, tag_server, path, body, words):
    server = classify_server if path == "/v1/classify" else tag_server
    r = post(server, path, body)
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert words in error["message"] and "\n" not in error["message"]


def test_the_head_routes_need_the_key(tag_server):
    r = post(tag_server, "/v1/tag", {"input": "张伟"}, auth=False)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
