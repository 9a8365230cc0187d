"""PII scrubbing: e-mail addresses, phone numbers, IP addresses and card numbers become placeholders.

The patterns are deliberately narrow so that ordinary text with digits (years, dates, times, prices,
version numbers, counts) is left alone: a phone number needs phone punctuation or a leading ``+``,
and a card number must pass the Luhn check. The placeholders are tokenizer symbols of their own
(see ``tokenizer.py``), so a scrubbed span costs one token.
"""
from __future__ import annotations

import re
from collections import Counter

PLACEHOLDERS = {"email": "<EMAIL>", "card": "<CARD>", "ip": "<IP>", "phone": "<PHONE>"}

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}\b")
# 13-19 digits, contiguous or in groups separated by single spaces/dashes; checked with Luhn below.
_CARD = re.compile(r"(?<![\d.,-])(?:\d[ -]?){12,18}\d(?![\d.,]\d)")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.]*\d)")
_H16 = r"[0-9A-Fa-f]{1,4}"
_IPV6 = re.compile(rf"(?<![\w:])(?:(?:{_H16}:){{7}}{_H16}|(?:{_H16}:){{1,6}}:(?:{_H16}(?::{_H16}){{0,5}})?"
                   rf"|::(?:{_H16}(?::{_H16}){{0,6}}))(?![\w:])")
# +CC then digit groups; or North-American (555) 123-4567 / 555-123-4567 / 555.123.4567.
_PHONE = re.compile(
    r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{2,4}){2,5}(?!\w)"
    r"|(?<![\w(])(?:\(\d{3}\) ?|\d{3}[.-])\d{3}[.-]\d{4}(?![\w-])"
)


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(m: re.Match) -> bool:
    digits = re.sub(r"[ -]", "", m.group())
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and _luhn_ok(digits)


def _has_digit(m: re.Match) -> bool:
    return any(c.isdigit() for c in m.group())  # "::" between hex-looking names in code (a::b) is not an address


def _is_phone(m: re.Match) -> bool:
    return 8 <= sum(c.isdigit() for c in m.group()) <= 15


def _digits(line: str) -> int:
    return sum(map(line.count, "0123456789"))


# (kind, pattern, check of a match, cheap test of a line that the pattern can match at all)
_RULES = [
    ("email", _EMAIL, None, lambda line: "@" in line),
    ("card", _CARD, _is_card, lambda line: _digits(line) >= 13),
    ("ip", _IPV4, None, lambda line: "." in line),
    ("ip", _IPV6, _has_digit, lambda line: "::" in line or line.count(":") >= 7),
    ("phone", _PHONE, _is_phone, lambda line: _digits(line) >= 8),
]


_CANDIDATE_LINE = re.compile(r"(?m)^.*[\d@].*$")  # every pattern needs a digit, or @ for e-mail; none spans lines


def _scrub_line(line: str, counts: Counter) -> str:
    for kind, pattern, accept, may_match in _RULES:
        if not may_match(line):
            continue

        def replace(m: re.Match, kind=kind, accept=accept) -> str:
            if accept is not None and not accept(m):
                return m.group()
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        line = pattern.sub(replace, line)
    return line


def scrub(text: str) -> tuple[str, Counter]:
    """``text`` with PII replaced by placeholders, and how many of each kind were replaced."""
    counts: Counter = Counter()
    return _CANDIDATE_LINE.sub(lambda m: _scrub_line(m.group(), counts), text), counts
