"""Log lines as key=value pairs, one event per line. Values come from outside (file names,
object names, parse errors quoting a file): escaped here, so none can end a line or hide one."""
from __future__ import annotations

from typing import Any

_NAMED = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def kv(**fields: Any) -> str:
    """key=value pairs; a value with a space, quote, '=' or unprintable character quoted."""
    return " ".join(f"{key}={escape(value)}" for key, value in fields.items())


def escape(value: Any) -> str:
    """str(value) as it is when plain, else quoted with repr-like escapes: control
    characters (\\r, ESC, ...), line separators and bidirectional overrides included."""
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return '"' + "".join(_escape_char(c) for c in text) + '"'


def _escape_char(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    if c.isprintable() or c == " ":
        return c
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else \
        f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
