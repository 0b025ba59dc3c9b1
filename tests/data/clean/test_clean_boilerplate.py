"""Page furniture goes line by line; the article, and text that only mentions such words, stays."""

import json

import pytest
from clean_samples import CHINESE, ENGLISH

from lmforge.data.clean import clean, load_recipe
from lmforge.data.clean.document import Document
from lmforge.data.clean.filters.boilerplate import BoilerplateFilter, BoilerplateParams

BOILERPLATE = BoilerplateFilter(BoilerplateParams())
# nine lines of article: a line at its end is past the first lines, where menus are looked for
BODY = "\n\n".join([ENGLISH, ENGLISH.replace("city", "town"), ENGLISH.replace("river", "lake")])


def removed(text: str, language: str = "en") -> tuple[list[tuple[str, str]], str | None, str]:
    doc = Document(text=text, id="t", language=language)
    reason = BOILERPLATE.apply(doc)
    return doc.removed_lines, reason, doc.text


@pytest.mark.parametrize("line,rule", [
    ("Home > Tutorials > Python", "navigation"),
    ("首页 > 技术 > 人工智能", "navigation"),
    ("当前位置：首页 > 法律知识 > 个人信息保护", "navigation"),
    ("About | Events | Volunteer | Donate | Contact", "navigation"),
    ("Docs / Guides / Version control", "navigation"),
    ("Share this: Twitter | Facebook | LinkedIn | Email", "share_subscribe"),
    ("分享到：微信 微博 QQ空间", "share_subscribe"),
    ("点赞(356) 收藏(87) 分享", "share_subscribe"),
    ("【纠错】 【打印】 【关闭窗口】", "share_subscribe"),
    ("Facebook Twitter LinkedIn Email", "share_subscribe"),
    ("Sign up for our morning newsletter", "share_subscribe"),
    ("Was this page helpful? Yes No", "share_subscribe"),
    ("Copyright © 2024 CodeCorner Media. All rights reserved.", "copyright"),
    ("版权所有 © 2024 码农笔记 京ICP备12345678号", "copyright"),
    ("本文为作者原创，未经授权禁止转载", "copyright"),
    ("上一篇：MySQL 慢查询排查实战", "prev_next"),
    ("Next post: Choosing between UUID and serial keys »", "prev_next"),
    ("Posted by Sam Carter on June 3, 2024", "byline_tags"),
    ("Tags: docker, ci, build-cache", "byline_tags"),
    ("责任编辑：王晓明", "byline_tags"),
    ("发布于 2023-05-01 12:30", "byline_tags"),
])
def test_each_rule_takes_its_lines(line, rule):
    text = f"{line}\n{BODY}" if rule == "navigation" else f"{BODY}\n{line}"
    lines, reason, kept = removed(text)
    assert reason is None and lines == [(rule, line)]
    assert kept == BODY


def test_a_related_block_and_a_link_tail_go_with_their_headings():
    page = "\n".join([
        "深入理解 Transformer 中的自注意力机制", CHINESE,
        "相关文章", "大模型推理加速的五种方法", "2024-03-11", "阅读全文>>", "一文看懂卷积神经网络",
        "热门推荐", "从零开始训练一个分词器",
    ])
    lines, reason, kept = removed(page, "zh")
    assert reason is None
    assert kept == "深入理解 Transformer 中的自注意力机制\n" + CHINESE  # the title stays; the block goes
    # (the date and "阅读全文>>" are a byline and a button wherever they are)
    assert sorted(r for r, _ in lines) == ["byline_tags"] + ["related_links"] * 5 + ["share_subscribe"]
    # headline lines after the article without a heading: two or more go, one alone stays
    tail = ENGLISH + "\nStocks slip as investors await jobs report\nHeat wave expected to peak on Thursday"
    assert removed(tail)[2] == ENGLISH
    signature = ENGLISH + "\nMargaret Hill, Eastside"
    assert removed(signature) == ([], None, signature)


def test_the_page_title_repeated_as_its_heading_goes_once():
    page = "Weeknight lentil soup\nHome > Recipes > Soups\nWeeknight lentil soup\n" + ENGLISH
    lines, _, kept = removed(page)
    assert lines == [("navigation", "Home > Recipes > Soups"), ("repeated_title", "Weeknight lentil soup")]
    assert kept == "Weeknight lentil soup\n" + ENGLISH


@pytest.mark.parametrize("text", [
    # verse and prose that use the words of page chrome
    "Share with thy birthright! Love all, trust a few,\nDo wrong to none: be able for thine enemy\nRather in power than use.",
    "Now, fair one, does your business follow us?\nSubscribe to your deep oaths, and keep it too.",
    "他把照片分享到朋友圈。\n来源可靠的消息说，会议推迟到下周。",
    "Published in 1925, the novel sold fewer copies than expected.\nThe author died believing it a failure.",
    # a poem ending in short lines, and a list page with nothing else: for the document filters
    "O, that infected moisture of his eye,\nO, that false fire which in his cheek so glow'd,\nAnd new pervert a reconciled maid.'",
    "Home\nAbout Us\nProducts\nServices\nContact",
    # a table row in the body of an article is not a menu
    BODY + "\nInput: 3 | Output: 5 | Time: 2 s\n" + ENGLISH.replace("river", "sea"),
])
def test_text_that_only_looks_like_chrome_stays(text):
    assert removed(text) == ([], None, text)


def test_a_page_of_nothing_but_chrome_is_removed():
    page = "Share this article\nSubscribe to our newsletter\nFollow us\n© 2024 Daily Herald. All rights reserved."
    assert removed(page)[1] == "no_lines_left"


def test_rules_can_be_switched_off():
    only_copyright = BoilerplateFilter(BoilerplateParams(rules=["copyright"]))
    doc = Document(text="Home > News > Tech\n" + ENGLISH + "\n© 2024 The Courier", id="t", language="en")
    assert only_copyright.apply(doc) is None
    assert doc.text == "Home > News > Tech\n" + ENGLISH


def test_lines_removed_are_counted_in_the_report(tmp_path):
    page = "\n".join(["首页 > 技术 > 人工智能", CHINESE, "分享到：微信 微博 QQ空间", "相关文章", "一文看懂卷积神经网络",
                      "从零开始训练一个分词器", "版权所有 © 2024 码农笔记 京ICP备12345678号"])
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"id": "page-1", "text": page}, ensure_ascii=False) + "\n")
    stats = clean([str(raw)], tmp_path / "out", load_recipe(output={"plots": False}))
    step = stats["steps"]["boilerplate"]
    assert step["docs_removed"] == 0 and step["docs_out"] == 1
    assert step["lines_removed"] == {"navigation": 1, "share_subscribe": 1, "related_links": 3, "copyright": 1}
    assert {"id": "page-1", "reason": "navigation", "line": "首页 > 技术 > 人工智能"} in step["line_samples"]
    [record] = [json.loads(line) for line in (tmp_path / "out" / "part-00000.jsonl").read_text().splitlines()]
    assert record["text"].split("\n")[0].startswith("北京是中华人民共和国的首都")
    assert "相关文章" not in record["text"] and "版权所有" not in record["text"]
