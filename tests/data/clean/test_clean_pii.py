"""PII patterns, their checksums, placeholders and counts."""

import random

import pytest

from lmforge.data.clean.pii import cn_id_valid, luhn_valid, scrub
from lmforge.data.clean.recipe import PiiConfig

ON = PiiConfig()


def make_cn_id(rng: random.Random) -> str:
    """A random resident ID number with a correct check character."""
    body = f"{rng.randint(110000, 659999)}{rng.randint(1950, 2005)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(0, 999):03d}"
    total = sum(int(d) * w for d, w in zip(body, (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)))
    return body + "10X98765432"[total % 11]


def make_card(rng: random.Random, length: int = 16) -> str:
    """A random card number with a correct Luhn digit."""
    digits = [rng.randint(1, 9)] + [rng.randint(0, 9) for _ in range(length - 2)]
    for check in range(10):
        if luhn_valid("".join(map(str, digits + [check]))):
            return "".join(map(str, digits + [check]))
    raise AssertionError


def test_luhn_and_resident_id_checksums():
    assert luhn_valid("4111111111111111") and luhn_valid("5500000000000004") and luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112")
    assert cn_id_valid("11010519491231002X") and cn_id_valid("11010519491231002x")
    assert not cn_id_valid("110105194912310021") and not cn_id_valid("1101051949123100")
    rng = random.Random(0)
    for _ in range(200):
        number = make_cn_id(rng)
        assert cn_id_valid(number)
        wrong = number[:17] + ("0" if number[17] != "0" else "1")
        assert not cn_id_valid(wrong)


@pytest.mark.parametrize("text,expected,counts", [
    ("Mail john.doe+tag@example.co.uk now.", "Mail <EMAIL> now.", {"email": 1}),
    ("Call +1 (555) 123-4567 or 555.123.4567 today.", "Call <PHONE> or <PHONE> today.", {"phone": 2}),
    ("London office: +44 20 7946 0958.", "London office: <PHONE>.", {"phone": 1}),
    ("手机 13812345678，或者 +86 138 1234 5678。", "手机 <PHONE>，或者 <PHONE>。", {"phone": 2}),
    ("Card 4111 1111 1111 1111 and 4111-1111-1111-1112 and 5500000000000004.",
     "Card <CARD_NUMBER> and 4111-1111-1111-1112 and <CARD_NUMBER>.", {"card": 2}),
    ("身份证号 11010519491231002X，错误的 110105194912310021。", "身份证号 <CN_ID>，错误的 110105194912310021。", {"cn_id": 1}),
    ("Server 192.168.1.1, not 999.1.1.1 nor v1.2.3.4.5; 2001:0db8:85a3:0000:0000:8a2e:0370:7334.",
     "Server <IP_ADDRESS>, not 999.1.1.1 nor v1.2.3.4.5; <IP_ADDRESS>.", {"ip": 2}),
])
def test_pii_is_replaced_by_typed_placeholders(text, expected, counts):
    scrubbed, found = scrub(text, ON)
    assert scrubbed == expected
    assert dict(found) == counts


def test_ordinary_numbers_are_left_alone():
    text = "In 2023 there were 12345 visitors on 2023-01-15; order 1234567890123 shipped at 10:30."
    assert scrub(text, ON) == (text, {})


def test_random_valid_numbers_are_all_found():
    rng = random.Random(1)
    ids = [make_cn_id(rng) for _ in range(50)]
    cards = [make_card(rng, rng.choice([13, 15, 16, 19])) for _ in range(50)]
    text = " ".join(f"编号 {i} 卡号 {c}。" for i, c in zip(ids, cards))
    scrubbed, found = scrub(text, ON)
    assert found == {"cn_id": 50, "card": 50}
    assert not any(i in scrubbed for i in ids) and not any(c in scrubbed for c in cards)


def test_each_kind_can_be_switched_off():
    text = "Mail a@b.org or call 555-123-4567."
    assert scrub(text, PiiConfig(email=False))[0] == "Mail a@b.org or call <PHONE>."
    assert scrub(text, PiiConfig(enabled=False)) == (text, {})
