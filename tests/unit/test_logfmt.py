"""key=value log lines: a value from outside can neither end the line nor hide in it."""
from __future__ import annotations

import pytest

from agent.logfmt import escape, kv

CASES = [
    ("web", "web"),
    ("", '""'),
    ("a b", '"a b"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("k=v", '"k=v"'),
    ("a\\b", '"a\\\\b"'),
    ("line\nbreak\r", '"line\\nbreak\\r"'),
    ("\x1b[2Jcleared", '"\\x1b[2Jcleared"'),
    ("rtl\u202eoverride", '"rtl\\u202eoverride"'),
    ("sep\u2028line", '"sep\\u2028line"'),
    ("caf\u00e9", "caf\u00e9"),           # printable non-ASCII stays readable
]


@pytest.mark.parametrize("value,want", CASES, ids=[repr(v) for v, _ in CASES])
def test_escape(value, want):
    assert escape(value) == want


def test_kv_line():
    assert kv(event="parse_error", file="a\rb.yaml", objects=3) == \
        'event=parse_error file="a\\rb.yaml" objects=3'
