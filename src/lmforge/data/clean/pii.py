"""PII scrubbing: typed placeholders for e-mails, phones, IPs, card numbers and Chinese IDs.

Numbers that carry a checksum are only replaced when it holds (Luhn for payment cards,
ISO 7064 MOD 11-2 for the 18-character resident ID), which keeps ordinary long numbers.
Order matters: IDs and cards are matched before phone numbers, whose pattern would
otherwise eat part of them.
"""

from __future__ import annotations

import re
from collections import Counter

from lmforge.data.clean.recipe import PiiConfig

PLACEHOLDERS = {"email": "<EMAIL>", "cn_id": "<CN_ID>", "card": "<CARD_NUMBER>", "ip": "<IP_ADDRESS>", "phone": "<PHONE>"}

EMAIL_RE = re.compile(r"(?<![\w.+-])[\w.+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}\b")
CN_ID_RE = re.compile(r"(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[0-9Xx](?![0-9A-Za-z])")
CARD_RE = re.compile(r"(?<![\d+-])\d(?:[ -]?\d){12,18}(?![\d-])")
IPV4_RE = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.]|\.\d)")
IPV6_RE = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![0-9A-Fa-f:])")
PHONE_RES = (
    # Chinese mobile numbers, optionally with +86
    re.compile(r"(?<!\d)(?:\+?86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}(?!\d)"),
    # North American numbers: (555) 123-4567, 555-123-4567, +1 555 123 4567
    re.compile(r"(?<![\w+])(?:\+?1[ .-]?)?(?:\(\d{3}\)|\d{3})[ .-]?\d{3}[ .-]\d{4}(?!\d)"),
    # International numbers written with a + country code: +44 20 7946 0958
    re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\d)"),
)

_DIGIT_RE = re.compile(r"\d")
_CN_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_ID_CHECK = "10X98765432"


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def cn_id_valid(number: str) -> bool:
    """ISO 7064 MOD 11-2 check character of an 18-character resident ID number."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _CN_ID_WEIGHTS))
    return _CN_ID_CHECK[total % 11] == number[17].upper()


def _card_valid(match: str) -> bool:
    digits = re.sub(r"[ -]", "", match)
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_valid(digits)


def scrub(text: str, config: PiiConfig) -> tuple[str, Counter]:
    """The text with PII replaced by placeholders, and how many of each kind were replaced."""
    counts: Counter = Counter()
    if not config.enabled:
        return text, counts

    def replace(pattern: re.Pattern, kind: str, text: str, check=None) -> str:
        def substitute(match: re.Match) -> str:
            if check is not None and not check(match.group()):
                return match.group()
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        return pattern.sub(substitute, text)

    if config.email and "@" in text:
        text = replace(EMAIL_RE, "email", text)
    if _DIGIT_RE.search(text) is None:
        return text, counts
    if config.cn_id:
        text = replace(CN_ID_RE, "cn_id", text, cn_id_valid)
    if config.card:
        text = replace(CARD_RE, "card", text, _card_valid)
    if config.ip:
        text = replace(IPV4_RE, "ip", text)
        if ":" in text:
            text = replace(IPV6_RE, "ip", text)
    if config.phone:
        for pattern in PHONE_RES:
            text = replace(pattern, "phone", text)
    return text, counts
