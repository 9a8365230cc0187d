"""Unicode normalisation and document quality rules.

The rules follow the Gopher heuristics (Rae et al. 2021, appendix A.1.1): word count and mean word
length bounds, symbol and non-alphabetic word ratios, and the repetition rules (share of duplicated
lines, and of characters in duplicated lines). Each rule is a number in :class:`QualityRules`; 0
switches a rule off. A document is dropped with the name of the first rule it fails.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

NORMALIZATIONS = ("NFC", "NFKC", "none")
# The counts run on the UTF-8 bytes (bytes.split/translate are several times faster than their str
# versions): words are split on ASCII whitespace, and any non-ASCII character counts as a letter.
_SPACE = b" \t\n\r\x0b\x0c"
_DIGITS = b"0123456789"
_PLAIN = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" + _DIGITS + _SPACE + b".,;:!?'\"()[]&/-"
_SYMBOL = re.compile(r"[^\w\s]|_")  # among non-ASCII characters: neither letter, digit nor space
_LETTERLESS_WORD = re.compile(rb"\s[^\sA-Za-z\x80-\xff]++(?=\s)")  # on b" " + data + b" "


@dataclass
class QualityRules:
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    max_symbol_ratio: float = 0.1  # non-space chars that are neither letters, digits nor common punctuation
    max_digit_ratio: float = 0.3  # digits among non-space chars
    min_alpha_words: float = 0.8  # words with at least one letter
    max_dup_line_frac: float = 0.3  # lines that occur more than once
    max_dup_line_char_frac: float = 0.2  # characters in lines that occur more than once
    max_line_chars: int = 100_000  # a longer line is minified code or binary junk (checked first)


def normalize(text: str, form: str) -> str:
    """Unicode normalisation (NFC keeps meaning; NFKC also folds compatibility forms like ﬁ, ２)."""
    if form == "none" or (form == "NFC" and text.isascii()):
        return text
    return unicodedata.normalize(form, text)


def _symbols(data: bytes) -> int:
    rest = data.translate(None, _PLAIN)
    return len(rest) if rest.isascii() else len(_SYMBOL.findall(rest.decode()))


def quality_failure(text: str, rules: QualityRules) -> str | None:
    """The name of the first rule ``text`` fails, or None if it passes all of them."""
    lines = text.splitlines()
    if rules.max_line_chars and max(map(len, lines), default=0) > rules.max_line_chars:
        return "long_line"
    data = text.encode()
    words = data.split()
    n = len(words)
    if rules.min_words and n < rules.min_words:
        return "too_few_words"
    if rules.max_words and n > rules.max_words:
        return "too_many_words"
    nonspace = len(text) - (len(data) - len(data.translate(None, _SPACE)))  # characters
    mean_len = nonspace / max(n, 1)
    if (rules.min_mean_word_len and mean_len < rules.min_mean_word_len) or (
            rules.max_mean_word_len and mean_len > rules.max_mean_word_len):
        return "mean_word_length"
    if rules.max_symbol_ratio and _symbols(data) > rules.max_symbol_ratio * nonspace:
        return "symbol_ratio"
    if rules.max_digit_ratio and len(data) - len(data.translate(None, _DIGITS)) > rules.max_digit_ratio * nonspace:
        return "digit_ratio"
    if rules.min_alpha_words and n - len(_LETTERLESS_WORD.findall(b" " + data + b" ")) < rules.min_alpha_words * n:
        return "alpha_words"
    if rules.max_dup_line_frac or rules.max_dup_line_char_frac:
        counts = Counter(map(str.strip, lines))
        counts.pop("", None)  # blank lines separate paragraphs; they are not repetition
        dup_lines = sum(c for c in counts.values() if c > 1)
        if rules.max_dup_line_frac and dup_lines > rules.max_dup_line_frac * counts.total():
            return "duplicate_lines"
        dup_chars = sum(len(s) * c for s, c in counts.items() if c > 1)
        all_chars = sum(len(s) * c for s, c in counts.items())
        if rules.max_dup_line_char_frac and dup_chars > rules.max_dup_line_char_frac * all_chars:
            return "duplicate_line_chars"
    return None
