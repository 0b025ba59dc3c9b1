"""Language identification on mixed text: Chinese with English terms is Chinese; variants are zh."""

import json

import pytest
from clean_samples import CHINESE, ENGLISH, JAPANESE

from lmforge.data.clean import clean, load_recipe
from lmforge.data.clean.langid import identify, normalize_code

# Chinese technical paragraphs as they are written: English terms in brackets, API names inline.
# py3langid alone calls the first one wuu (0.54) and gives the others under 0.65.
MIXED_CHINESE = [
    "在 PyTorch 中，我们可以使用 torch.nn.Module 来定义模型（model）。训练时调用 optimizer.step() 更新参数（parameters），"
    "再用 DataLoader 加载数据（dataset）。",
    "自注意力机制（Self-Attention）是 Transformer 模型的核心组件，查询（Query）、键（Key）和值（Value）三个矩阵由输入经过线性变换得到。",
    "把 num_workers 设为 CPU 核数的一半，再打开 pin_memory，GPU 利用率（GPU utilization）通常会明显上升。",
    "Pod 一直处于 Pending 状态时，先用 kubectl describe pod 查看 Events，常见原因是 Insufficient cpu 或 Insufficient memory。",
    "LoRA（Low-Rank Adaptation）冻结原模型的权重，只训练注意力层旁边的两个低秩矩阵 A 和 B。",
]


@pytest.mark.parametrize("text", MIXED_CHINESE)
def test_chinese_with_english_terms_is_chinese_with_a_high_score(text):
    language, score = identify(text)
    assert language == "zh" and score >= 0.9


@pytest.mark.parametrize("text,expected", [
    (ENGLISH, "en"),
    (CHINESE, "zh"),
    (JAPANESE, "ja"),
    ("臺北市立圖書館推出夜間閱覽服務，為了方便上班族與學生利用下班、下課後的時間讀書。", "zh"),  # traditional
    ("佢哋今日喺度食咗飯，我哋聽日再嚟睇下點樣。", "zh"),  # Cantonese
    ("서울은 대한민국의 수도이며 가장 큰 도시입니다. 한강이 도시를 가로질러 흐릅니다.", "ko"),
    ("The word 你好 means hello in Chinese, and it is usually the first word that learners meet.", "en"),
    ("Die Stadt liegt an einem großen Fluss und ist für ihre alte Brücke bekannt.", "de"),
])
def test_languages_by_script_and_by_classifier(text, expected):
    assert identify(text)[0] == expected


def test_the_score_is_the_share_of_the_text_in_the_language():
    # 21 CJK characters against 40 English words: a third of the text is Chinese
    mixed = "\n".join(["这是一段中文的说明文字，介绍了模型的训练方法。"]
                      + ["This paragraph explains how the model was trained and evaluated."] * 4)
    language, score = identify(mixed)
    assert language == "en" and 0.55 < score < 0.7  # English, at about two thirds
    assert identify(CHINESE)[1] == 1.0


def test_chinese_variants_mean_zh():
    assert {normalize_code(c) for c in ("zh", "ZH-Hant", "zh_TW", "cmn", "yue", "wuu", "zho")} == {"zh"}
    assert normalize_code("EN") == "en"
    assert load_recipe(langid={"languages": "en, zh-Hans, yue"}).langid.languages == ["en", "zh"]


def test_languages_zh_keeps_mixed_paragraphs_and_reports_language_of_removed(tmp_path):
    raw = tmp_path / "raw.jsonl"
    records = [{"id": f"p{i}", "text": t} for i, t in enumerate(MIXED_CHINESE)] + [
        {"id": "en", "text": ENGLISH}, {"id": "ja", "text": JAPANESE}]
    raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    recipe = load_recipe(langid={"languages": "zh"}, filters={"boilerplate": {}}, output={"plots": False},
                         dedup={"near": False})
    stats = clean([str(raw)], tmp_path / "out", recipe)
    kept = [json.loads(line) for line in (tmp_path / "out" / "part-00000.jsonl").read_text().splitlines()]
    assert [r["id"] for r in kept] == [f"p{i}" for i in range(len(MIXED_CHINESE))]
    assert all(r["lang"] == "zh" and r["lang_score"] >= 0.9 for r in kept)
    samples = {s["id"]: s for s in stats["steps"]["langid"]["samples"]}
    assert samples["en"]["reason"] == "other_language:en" and samples["en"]["lang"] == "en"
    assert samples["en"]["lang_score"] > 0.9 and samples["ja"]["lang"] == "ja"
