"""Page furniture removed line by line: navigation, share bars, related-article blocks, footers.

Web text keeps the chrome of the page it came from. Judged as a whole, an article with a
block of unrelated headlines under it looks like a list of links (few lines end in
punctuation, the same "Read more" line repeats), and the document filters drop the article
with its tail. This filter removes the chrome first, the way trafilatura-style extraction
and FineWeb's line filters do, and leaves the article to the document filters. Each removed
line is counted under its rule, in English and Chinese:

- `navigation`: breadcrumbs and menus in the first lines of the page: short items joined by
  `>`, `›`, `»` (one or more), or by `|`, `/`, `·` (two or more): "Home > News > Tech",
  "首页 > 新闻 > 科技", "About | Events | Contact";
- `share_subscribe`: share bars, like/collect/comment buttons, newsletter and follow prompts,
  "was this page helpful": "Share this: Twitter | Facebook", "分享到：微信 微博", "点赞 收藏 评论";
- `copyright`: "Copyright © 2024 …", "© 2024 …", "All rights reserved", "版权所有", ICP licence
  numbers, "转载请注明出处" / "未经授权禁止转载";
- `prev_next`: "上一篇：…", "下一篇：…", "« Previous post", "Next post: …", "Read next: …";
- `byline_tags`: bylines and metadata lines: "Posted by …", "Tags: …", "作者：…", "来源：…",
  "责任编辑：…", "阅读(3521)", "本文链接：…", disclaimers;
- `related_links`: a heading such as "Related articles", "You may also like", "相关文章",
  "热门推荐", "猜你喜欢", with the headline-like lines under it (short, no sentence end);
- `link_tail`: two or more headline-like lines after the article's last sentence (lists of
  links, dates and "Read more" lines that have no heading);
- `repeated_title`: the page title repeated as the heading (the same line twice in the
  first lines).

Only short lines (`short_line_words`, a CJK character counting as a word) are judged, so a
sentence of the article that mentions "copyright" or "share" stays.
"""

from __future__ import annotations

import re
from typing import Literal

from lmforge.data.clean.document import Document
from lmforge.data.clean.filters import Filter, FilterParams
from lmforge.data.clean.text import words

RULES = ("navigation", "share_subscribe", "copyright", "prev_next", "byline_tags", "related_links", "link_tail",
         "repeated_title")
_HEAD_LINES = 6  # navigation and a repeated title are looked for in the first lines of the page
_SENTENCE_END = (".", "!", "?", "。", "！", "？", "…", '"', "”", "」", "』", ":", "：", ";", "；")
_CLOSERS = ")]）】\"'”’」』"
_MID_SENTENCE = (",", "，", "、", ";", "；", "-", "—", "–")

_ARROW_SEP_RE = re.compile(r"\s*[>›»]\s*")
_LIST_SEP_RE = re.compile(r"\s+[|/·•]\s+|\s*[|｜]\s*")
_NAV_ITEM_WORDS = 8  # words in one breadcrumb or menu item (a CJK character counts as a word)

# Markers, matched against the lower-cased line (`^` anchors its start). Page chrome never
# ends a sentence, so most markers only count on a line that does not: "Share with thy
# birthright!" and "他把照片分享到朋友圈。" are text. Notices (copyright, disclaimers, "Comments
# are closed.") are sentences, and count either way.
_CHROME = [
    ("share_subscribe", re.compile(
        r"^share( this( article| post| page| story| recipe)?| via)?\s*(:.*)?$|^share on (facebook|twitter|x|linkedin"
        r"|whatsapp|pinterest|reddit|email)\b|^tweet$|^pin it\b|^print( recipe| this page| this article)?$|^jump to recipe"
        r"|^subscribe( now| today| here)?$|^subscribe to (our|my|the) |^subscribe to get\b|^sign up( now| today| for free)?$"
        r"|^sign up for (our|the|a free)\b|^follow us( on\b|:|$)|^leave a (reply|comment)$|^\d* ?comments?$"
        r"|^report a problem( with this page)?$|\bedit (this page )?on github$|^table of contents$|^skip to (main )?content$"
        r"|^back to top$|^advertisement$|continues below (the )?advertisement$|^rate this (recipe|article|post)\b"
        r"|^save to (favou?rites|my recipes)$"
        r"|^分享到|^分享$|^转发|^关注我们|^订阅|^点击(进入|查看|阅读|这里)|^目录$|^文章目录$|^(展开)?阅读全文|^查看全文"
        r"|^扫一扫|^广告$")),
    ("prev_next", re.compile(
        r"^«|»$|^(previous|next|prev|older|newer) (post|article|page|story|entry)\b|^(older|newer) posts\b|^read next\b"
        r"|^上一(篇|页|章)|^下一(篇|页|章)")),
    ("byline_tags", re.compile(
        r"^(posted|published|filed) (by|in|on|under)\b|^written by\b|^by [^\s]+ [^\s]+ ·|^tags?:|^tagged\b"
        r"|^categor(y|ies):|^(page )?last (reviewed|updated|modified)\b"
        r"|^(作者|来源|本文来源|文章来源|责任编辑|编辑|审核|发布时间|发布日期|时间|标签|关键词|关键字|本文链接|原文链接|出处"
        r"|索引号|发文机关|发布机构|主题分类|成文日期|文号|词条标签)[:：]"
        r"|^(阅读|浏览|点击|评论)(量|数|次数)?\s*[:：(（]\s*\d")),
]
_NOTICES = [
    ("share_subscribe", re.compile(
        r"\bshare it with (a|your) friends?\b|^pin it for later|^comments are closed|was this (page|article) helpful"
        r"|is this page useful|对您有帮助吗|有帮助吗|评论已关闭")),
    ("copyright", re.compile(
        r"copyright\s*(©|\(c\)|\d{4})|©\s*\d{4}|^©|all rights reserved|版权所有|版权声明|保留所有权利|icp备|icp证|公网安备"
        r"|转载请|禁止转载|未经授权|不得转载")),
    ("byline_tags", re.compile(r"^affiliate disclosure|^disclaimer:|^retrieved (from|on)\b.{0,80}\d{4}\.?$|^免责声明")),
]
# A line that is a date, with at most a few words around it ("Published 3 March 2023",
# "answered Mar 3, 2022 at 14:22", "发布于 2023-05-01 12:30") is a byline.
_DATE_RE = re.compile(
    r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b|\d{4}年\d{1,2}月\d{1,2}日"
    r"|\b(jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.? \d{1,2},? \d{4}\b"
    r"|\b\d{1,2} (jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]* \d{4}\b")
_DATE_LINE_WORDS = 8
_RELATED_HEADING_RE = re.compile(
    r"^(related( articles?| posts?| stories| content| reading| links)?|you (may|might) also like|more from\b.{0,40}"
    r"|more (stories|articles|news)|trending( now)?|popular( posts| articles| stories)?|most (popular|read|viewed)"
    r"|recommended( for you| reading| articles)?|latest (headlines|news|posts|articles)|top stories|read more|see also"
    r"|相关(文章|阅读|推荐|新闻|链接|内容|条目)|延伸阅读|推荐阅读|热门(推荐|文章|阅读|新闻|标签|排行)|猜你喜欢"
    r"|更多(新闻|文章|精彩|推荐)|今日要闻|最新(文章|新闻|资讯)|精彩推荐|阅读排行)[\s:：>»]*$")
# Words that share bars and page toolbars are made of (buttons, social networks): a line of
# nothing else is chrome.
_ACTIONS = frozenset("""
点赞 收藏 评论 分享 举报 打印 打印本页 纠错 关闭 关闭窗口 转发 赞 踩 回复 引用 打赏 阅读 浏览 字体 字号 大 中 小 顶 返回顶部
加入菜单 加入购物车 立即购买 微信 微博 朋友圈 qq qq空间 豆瓣 知乎
share like tweet print email e-mail save pin reply comment comments report
facebook twitter linkedin whatsapp reddit pinterest telegram wechat weibo messenger
""".split())
_ACTION_SPLIT_RE = re.compile(r"[\s|｜·:：【】\[\]]+")
_COUNT_RE = re.compile(r"[(（]?\d[\d,.]*[万kK]?[)）]?$")


def _units(line: str) -> int:
    return len(words(line))


def _is_navigation(line: str) -> bool:
    for separator, minimum in ((_ARROW_SEP_RE, 1), (_LIST_SEP_RE, 2)):
        parts = [p for p in separator.split(line) if p.strip()]
        if len(parts) > minimum and all(_units(p) <= _NAV_ITEM_WORDS for p in parts):
            return not line.rstrip().endswith(("。", "."))
    return False


def _is_action_bar(line: str) -> bool:
    """Nothing but toolbar words, each perhaps with a count: "点赞(356) 收藏(87) 分享", "Facebook Twitter Email"."""
    tokens = [_COUNT_RE.sub("", t).lower() for t in _ACTION_SPLIT_RE.split(line) if t]
    tokens = [t for t in tokens if t]
    return bool(tokens) and all(t in _ACTIONS for t in tokens)


def _is_date_line(line: str) -> bool:
    return _units(line) <= _DATE_LINE_WORDS and _DATE_RE.search(line.lower()) is not None


def _ends_sentence(line: str) -> bool:
    """Ends with sentence punctuation, also inside closing quotes or brackets ("[Exeunt.]", "maid.'")."""
    return line.rstrip().rstrip(_CLOSERS).endswith(_SENTENCE_END)


def _is_headline_like(line: str, short: int) -> bool:
    """A line that could be a link: short, not ending a sentence and not broken off mid-sentence
    (titles, dates, "Read more »"; not a verse line that ends with a comma)."""
    stripped = line.rstrip()
    return _units(line) <= short and not _ends_sentence(stripped) and not stripped.endswith(_MID_SENTENCE)


class BoilerplateParams(FilterParams):
    rules: list[Literal[RULES]] = list(RULES)  # type: ignore[valid-type]
    short_line_words: int = 30  # longest headline/marker line judged, in words (a CJK character is a word)


class BoilerplateFilter(Filter):
    name = "boilerplate"
    Params = BoilerplateParams

    def _marker(self, line: str, rules: set[str], short: int) -> str | None:
        if _units(line) > short:
            return None
        lowered = line.lower()
        for rule, pattern in _NOTICES:
            if rule in rules and pattern.search(lowered):
                return rule
        if _ends_sentence(line):
            return None
        for rule, pattern in _CHROME:
            if rule in rules and pattern.search(lowered):
                return rule
        if "share_subscribe" in rules and _is_action_bar(line):
            return "share_subscribe"
        if "byline_tags" in rules and _is_date_line(line):
            return "byline_tags"
        return None

    def apply(self, doc: Document) -> str | None:
        p = self.params_for(doc)
        rules, short = set(p.rules), p.short_line_words
        lines = doc.text.split("\n")
        content = [i for i, line in enumerate(lines) if line.strip()]
        verdict: dict[int, str] = {}
        head = content[:_HEAD_LINES]
        seen_in_head: set[str] = set()
        for i in head:
            line = lines[i].strip()
            if "repeated_title" in rules and line in seen_in_head and _is_headline_like(line, short):
                verdict[i] = "repeated_title"
            elif "navigation" in rules and _is_navigation(line):
                verdict[i] = "navigation"
            seen_in_head.add(line)
        for i in content:
            if i not in verdict and (rule := self._marker(lines[i].strip(), rules, short)) is not None:
                verdict[i] = rule
        if "related_links" in rules:
            self._related_blocks(lines, content, verdict, short)
        if "link_tail" in rules:
            self._link_tail(lines, content, verdict, short)
        if not verdict:
            return None
        for i in sorted(verdict):
            doc.removed_lines.append((verdict[i], lines[i].strip()))
        kept = [line for i, line in enumerate(lines) if i not in verdict]
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
        if not text:
            return "no_lines_left"
        doc.text = text
        return None

    @staticmethod
    def _related_blocks(lines: list[str], content: list[int], verdict: dict[int, str], short: int) -> None:
        """A related-links heading and the headline-like lines under it."""
        in_block = False
        for i in content:
            line = lines[i].strip()
            if _RELATED_HEADING_RE.match(line.lower()):
                in_block = True
                verdict[i] = "related_links"
            elif in_block and (i in verdict or _is_headline_like(line, short)):
                verdict.setdefault(i, "related_links")
            else:
                in_block = False

    @staticmethod
    def _link_tail(lines: list[str], content: list[int], verdict: dict[int, str], short: int) -> None:
        """The headline-like lines of a block of two or more such (or already removed) lines after the
        article's last sentence; a lone short last line (a signature, a command) stays."""
        block, tail = 0, []
        for i in reversed(content):
            if i not in verdict:
                if not _is_headline_like(lines[i].strip(), short):
                    break
                tail.append(i)
            block += 1
        else:
            return  # nothing but short lines: a list page, or a poem, is for the document filters to judge
        if block >= 2:
            for i in tail:
                verdict[i] = "link_tail"
