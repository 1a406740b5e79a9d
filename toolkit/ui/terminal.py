"""Text from data files and model answers made safe to print: every character that would steer the terminal is
shown as an escape instead of being sent raw.

A row or an answer can hold an escape sequence (ESC, U+001B, starts colour changes, cursor moves, title changes and
worse), other C0 and C1 control characters (NUL, backspace, carriage return overwrite what was printed), or Unicode
bidirectional controls that reorder how a line reads (U+202E shows `abc` as `cba`). rich strips only a few control
codes from `Text` (bell, backspace, vertical tab, form feed, carriage return), so everything here is escaped before
it reaches rich: `\\x1b`, `\\x00`, `\\u202e`. Backslashes are left as they are: this is for reading, not for parsing
back. The bidi set is Unicode's Bidi_Control property (PropList.txt): U+061C, U+200E-U+200F, U+202A-U+202E and
U+2066-U+2069. Lone surrogates are escaped too, as they cannot be encoded for the terminal at all.
"""

from __future__ import annotations

import re

CONTROL = "\x00-\x08\x0b-\x1f\x7f-\x9f"  # C0 except tab and line feed, DEL, C1
BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
SURROGATES = "\ud800-\udfff"
UNSAFE = re.compile(f"[{CONTROL}{BIDI}{SURROGATES}]")
UNSAFE_ONE_LINE = re.compile(f"[\t\n{CONTROL}{BIDI}{SURROGATES}]")
LINE_BREAKS = re.compile(r"[ \t\r\n]+")


def escape_char(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str) -> str:
    """`text` with every control, bidi-control and surrogate character escaped; tabs and line feeds are kept."""
    return UNSAFE.sub(escape_char, text)


def one_line(text: str) -> str:
    """`text` on one line for a table cell: runs of spaces, tabs and line breaks become one space, and everything
    `visible` escapes is escaped."""
    return UNSAFE_ONE_LINE.sub(escape_char, LINE_BREAKS.sub(" ", text).strip())
