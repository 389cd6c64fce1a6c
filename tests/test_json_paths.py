"""The orjson fast paths for request bodies and event data (issue 12) answer exactly as the
stdlib did: the same values, integers of any size exact, and the same refusals."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from handlers.http import decode_json
from server.errors import BadRequest, ValidationError
from server.events.store import data_text

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@seed(12)
@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_a_body_decodes_and_its_data_encodes_as_the_stdlib_did(value):
    raw = json.dumps({"data": value}, ensure_ascii=False).encode("utf-8", "surrogatepass")
    try:
        expected = json.loads(raw.decode("utf-8", "surrogatepass"))
    except ValueError:
        return
    decoded = decode_json(raw, 64)
    assert decoded == expected
    assert repr(decoded) == repr(expected)
    try:
        text = data_text(decoded["data"])
    except ValidationError:  # a lone surrogate: refused, as before
        with pytest.raises(UnicodeEncodeError):
            json.dumps(decoded["data"], ensure_ascii=False).encode()
        return
    assert repr(json.loads(text)) == repr(decoded["data"])


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b'{"n": 18446744073709551616}', {"n": 2**64}),  # past 64 bits: orjson would make it a float
        (b'{"n": -9223372036854775809}', {"n": -(2**63) - 1}),
        (b'\xef\xbb\xbf{"a": 1}', {"a": 1}),  # a BOM, which orjson refuses
        (b'{"a": "\\ud800"}', {"a": "\ud800"}),  # a lone surrogate escape
        ('{"a": 1}'.encode("utf-16"), {"a": 1}),
    ],
)
def test_what_orjson_would_get_wrong_or_refuse_decodes_as_before(raw, value):
    assert decode_json(raw, 64) == value


@pytest.mark.parametrize("raw", [b'{"a": NaN}', b'{"a": Infinity}', b"{", b"[" * 65 + b"]" * 65])
def test_what_is_not_json_is_still_a_400(raw):
    with pytest.raises(BadRequest):
        decode_json(raw, 64)


def test_an_infinite_number_in_the_data_is_still_a_422_not_a_null():
    decoded = decode_json(b'{"data": [null, 1E400]}', 64)
    assert math.isinf(decoded["data"][1])
    with pytest.raises(ValidationError):
        data_text(decoded["data"])
    assert data_text([None, 2**70]) == f"[null,{2**70}]"
