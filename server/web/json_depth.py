"""How deeply a JSON text nests, counted without recursion and without parsing it.

The stdlib decoder (and every recursive one) turns thousands of nested brackets into a
RecursionError; a client must get a 400 instead, and the limit must hold before any
decoder recurses. Strings are blanked out first, so brackets inside them do not count.
"""

from __future__ import annotations

import re
from array import array
from itertools import accumulate

STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")
SIGNS = str.maketrans({"[": "\x01", "{": "\x01", "]": "\xff", "}": "\xff"})


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects (0 for a scalar), in linear time."""
    brackets = NOT_A_BRACKET.sub("", STRING.sub("", text))
    if not brackets:
        return 0
    steps = array("b", brackets.translate(SIGNS).encode("latin-1"))
    return max(0, max(accumulate(steps)))


def nests_deeper_than(text: str, limit: int) -> bool:
    """Cheap for ordinary bodies: only a text with more openers than the limit is scanned."""
    if text.count("[") + text.count("{") <= limit:
        return False
    return nesting_depth(text) > limit
