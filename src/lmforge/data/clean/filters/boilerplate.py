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

_ARROW_SEP_RE = re.compile(r"\s*[>›»]\s*")
_LIST_SEP_RE = re.compile(r"\s+[|/·•]\s+|\s*[|｜]\s*")
_NAV_ITEM_WORDS = 8  # words in one breadcrumb or menu item (a CJK character counts as a word)

# Markers are matched against the lower-cased line; `^` anchors the start.
_MARKERS = {
    "share_subscribe": re.compile(
        r"^share\b|\bshare (this|on|it)\b|^tweet$|\bpin it\b|^print( recipe)?$|^jump to recipe|\bnewsletter\b"
        r"|^subscribe\b|^sign up\b|\bfollow us\b|^leave a (reply|comment)|^\d* ?comments?$|was this (page|article) helpful"
        r"|\bedit (this page )?on github\b|^table of contents$"
        r"|分享到|^分享$|朋友圈|^转发|关注我们|订阅|对您有帮助吗|有帮助吗|^点击(进入|查看|阅读|这里)|^目录$"),
    "copyright": re.compile(
        r"copyright\s*(©|\(c\)|\d{4})|©\s*\d{4}|^©|all rights reserved|版权所有|保留所有权利|icp备|icp证|公网安备"
        r"|转载请注明|禁止转载|未经授权|不得转载"),
    "prev_next": re.compile(
        r"^«|»$|^(previous|next|prev|older|newer) (post|article|page|story|entry)\b|^read next\b|^上一(篇|页|章)|^下一(篇|页|章)"),
    "byline_tags": re.compile(
        r"^(posted|published|written|filed) (by|in|on|under)\b|^by [^\s]+ [^\s]+ ·|^tags?:|^tagged\b|^categor(y|ies):"
        r"|^(page )?last (reviewed|updated|modified)\b|^affiliate disclosure|^disclaimer:"
        r"|^(作者|来源|本文来源|文章来源|责任编辑|编辑|发布时间|发布日期|时间|标签|关键词|关键字|本文链接|原文链接|出处)[:：]"
        r"|^免责声明|^(阅读|浏览|点击|评论)(量|数|次数)?\s*[:：(（]\s*\d"),
}
_RELATED_HEADING_RE = re.compile(
    r"^(related( articles?| posts?| stories| content| reading| links)?|you (may|might) also like|more from\b.{0,40}"
    r"|more (stories|articles|news)|trending( now)?|popular( posts| articles| stories)?|most (popular|read|viewed)"
    r"|recommended( for you| reading| articles)?|latest (headlines|news|posts|articles)|top stories|read more"
    r"|相关(文章|阅读|推荐|新闻|链接|内容)|延伸阅读|推荐阅读|热门(推荐|文章|阅读|新闻|标签|排行)|猜你喜欢|更多(新闻|文章|精彩|推荐)"
    r"|今日要闻|最新(文章|新闻|资讯)|精彩推荐|阅读排行)[\s:：>»]*$")
# one-word page actions that share bars are made of: a line of nothing else is chrome
_ACTIONS = frozenset("""
点赞 收藏 评论 分享 举报 打印 纠错 关闭 关闭窗口 转发 赞 踩 回复 引用 打赏 阅读 浏览 字号 大 中 小 顶 返回顶部
share like tweet print email save pin reply comment comments report
""".split())
_ACTION_TOKEN_RE = re.compile(r"[【\[(（]?\s*([^\s【】\[\]()（）|｜·]+?)\s*[】\])）]?(\s*[(（]?\d+[)）]?)?$")


def _units(line: str) -> int:
    return len(words(line))


def _is_navigation(line: str) -> bool:
    for separator, minimum in ((_ARROW_SEP_RE, 1), (_LIST_SEP_RE, 2)):
        parts = [p for p in separator.split(line) if p.strip()]
        if len(parts) > minimum and all(_units(p) <= _NAV_ITEM_WORDS for p in parts):
            return not line.rstrip().endswith(("。", "."))
    return False


def _is_action_bar(line: str) -> bool:
    tokens = [t for t in re.split(r"[\s|｜·]+", line) if t]
    if not tokens:
        return False
    for token in tokens:
        match = _ACTION_TOKEN_RE.match(token)
        if match is None or match.group(1).lower().rstrip(":：") not in _ACTIONS:
            return False
    return True


def _is_headline_like(line: str, short: int) -> bool:
    """A line that could be a link: short and not ending a sentence (titles, dates, "Read more »")."""
    return _units(line) <= short and not line.rstrip().endswith(_SENTENCE_END)


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
        for rule, pattern in _MARKERS.items():
            if rule in rules and pattern.search(lowered):
                return rule
        if "share_subscribe" in rules and _is_action_bar(line):
            return "share_subscribe"
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
