"""Sans-IO JSON stream splitter for QMP input: bytes in, whole JSON values (or errors) out.

Why not lines: qemu.qmp sends every command as compact JSON with no newline, and QEMU's own
parser (``qobject/json-streamer.c``) is a streaming one, so messages are found by counting
braces and brackets outside strings, as QEMU does.  A complete value is then decoded with
``json.JSONDecoder.raw_decode``.  The scan jumps between interesting bytes with a regex, so
feeding a large message costs O(bytes), and a message split anywhere (even one byte at a time)
gives the same result as the whole.

Compatibility with QEMU 7.2's parser (checked side by side against the real one): strings
may be single-quoted (``{'execute': 'quit'}``; ``\'`` escapes a quote in either kind), a
duplicate key is an error, and failures use QEMU's wording (``expecting value``, ``invalid
keyword 'tru'``, ``missing : in object pair``, ``expected separator in dict``...).

Limits (QEMU has the same two): a message bigger than ``max_size`` bytes or nested deeper than
``max_depth`` is refused with QEMU's sentence and the splitter becomes *fatal*: the rest of such
a message cannot be told from the next one, so the connection must close.  Control characters
and bytes >= 0x80 outside strings are "stray" (QEMU's documented way to reset the parser): the
partial message is dropped, an error is produced, and parsing resumes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from blocktrace.qmp import errors

DEFAULT_MAX_SIZE = 1 << 20
DEFAULT_MAX_DEPTH = 1024

# Outside strings, inside a container: structure, a quote, or a byte that is never valid there
# (control characters other than TAB/LF/CR, DEL, and anything >= 0x80).
_OUTSIDE = re.compile(rb"[{}\[\]\"'\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\xff]")
# Inside a string: its end, an escape, a raw control character (forbidden by RFC 8259) or a
# byte that never occurs in UTF-8.
_INSIDE = {
    0x22: re.compile(rb'["\\\x00-\x1f\xfe\xff]'),
    0x27: re.compile(rb"['\\\x00-\x1f\xfe\xff]"),
}
# End of a bare top-level scalar (number, keyword).
_SCALAR_END = re.compile(rb"[\s{}\[\]\"',:\x00-\x1f\x7f-\xff]")
_WS = b" \t\r\n"
_WORD = re.compile(r"[A-Za-z0-9_+.-]+")


@dataclass(frozen=True, slots=True)
class Value:
    """One complete JSON value (QMP wants an object; the protocol layer checks)."""

    value: object


@dataclass(frozen=True, slots=True)
class ParseError:
    """Input that is not JSON.  ``fatal``: the stream cannot be resynchronised."""

    desc: str
    fatal: bool = False


Item = Value | ParseError


def _reject_constant(name: str) -> object:
    raise ValueError(f"invalid keyword '{name}'")


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


@dataclass(frozen=True, slots=True)
class ExactNumber:
    """A JSON number too large for a double (``1e400``), kept as its text.

    QEMU turns it into ``inf`` and echoes an ``id`` of ``1e400`` as ``inf``, which is not JSON
    (nor is Python's ``Infinity``); kept as text, an id is echoed exactly as it came, as valid
    JSON (:func:`blocktrace.qmp.protocol.render_id`).  As an argument it is neither a number
    nor a string, so every typed parameter refuses it.
    """

    text: str


def _number(text: str) -> float | ExactNumber:
    value = float(text)
    return ExactNumber(text) if math.isinf(value) else value


_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_number, object_pairs_hook=_object
)


def _container_at(text: str, pos: int) -> str:
    """``dict`` or ``list``: the innermost container open at ``pos`` (for QEMU's wording)."""
    stack: list[str] = []
    quote = ""
    i = 0
    while i < pos:
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c in "{[":
            stack.append("dict" if c == "{" else "list")
        elif c in "}]" and stack:
            stack.pop()
        i += 1
    return stack[-1] if stack else "dict"


def _qemu_reason(exc: json.JSONDecodeError) -> str:
    """Python's decoder message in the words of QEMU's ``json-parser.c``."""
    msg, text, pos = exc.msg, exc.doc, exc.pos
    if msg == "Expecting value":
        word = _WORD.match(text, pos)
        if word and text[pos].isalpha():
            return f"invalid keyword '{word.group()}'"
        return "expecting value"
    if msg.startswith("Expecting property name"):
        return "expecting value" if text[pos : pos + 1] == "}" else "key is not a string in object"
    if msg == "Expecting ':' delimiter":
        return "missing : in object pair"
    if msg == "Expecting ',' delimiter":
        return f"expected separator in {_container_at(text, pos)}"
    if msg.startswith("Invalid \\escape") or msg.startswith("Invalid \\u"):
        return "invalid escape sequence in string"
    return msg[:1].lower() + msg[1:]


def _single_quotes_to_json(text: str) -> str:
    """Rewrite QEMU's extensions to plain JSON: single-quoted strings become double-quoted,
    and ``\\'`` becomes ``'``.  Strings are known to be terminated (the splitter saw them)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c not in "\"'":
            out.append(c)
            i += 1
            continue
        quote = c
        out.append('"')
        i += 1
        while i < n and text[i] != quote:
            d = text[i]
            if d == "\\" and i + 1 < n:
                e = text[i + 1]
                out.append("'" if e == "'" else d + e)
                i += 2
                continue
            out.append('\\"' if d == '"' else d)
            i += 1
        out.append('"')
        i += 1
    return "".join(out)


def decode(raw: bytes) -> Item:
    """Decode one delimited message, mapping every failure to QEMU's ``JSON parse error, ...``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ParseError(errors.json_parse_error("invalid UTF-8 sequence in string"))
    if "'" in text:
        text = _single_quotes_to_json(text)
    try:
        value, end = _DECODER.raw_decode(text)
    except json.JSONDecodeError as exc:
        return ParseError(errors.json_parse_error(_qemu_reason(exc)))
    except (ValueError, RecursionError) as exc:
        return ParseError(errors.json_parse_error(str(exc)))
    if text[end:].strip(" \t\r\n"):
        return ParseError(errors.json_parse_error("expecting value"))
    return Value(value)


class JSONSplitter:
    """Feed bytes, get complete values.  Holds at most one partial message (<= ``max_size``)."""

    def __init__(
        self, *, max_size: int = DEFAULT_MAX_SIZE, max_depth: int = DEFAULT_MAX_DEPTH
    ) -> None:
        self.max_size = max_size
        self.max_depth = max_depth
        self._buf = bytearray()  # the current partial message starts at _buf[0]
        self._pos = 0  # everything before _pos has been scanned
        self._depth = 0
        self._quote = 0  # the quote byte of the string being scanned, 0 outside strings
        self._string_start = 0
        self._scalar = False  # scanning a bare top-level scalar
        self.fatal = False

    @property
    def pending(self) -> int:
        """Bytes of a partial message held (0 between messages)."""
        return len(self._buf)

    def _reset(self, consumed: int) -> None:
        del self._buf[:consumed]
        self._pos = 0
        self._depth = 0
        self._quote = 0
        self._scalar = False

    def _emit(self, end: int, out: list[Item]) -> None:
        out.append(decode(bytes(self._buf[:end])))
        self._reset(end)

    def _stray(self, at: int, out: list[Item]) -> None:
        """A byte the lexer rejects.  Like QEMU, the error shows the token it ended (inside a
        string: the string so far), and the partial message is dropped."""
        start = self._string_start if self._quote else at
        token = bytes(self._buf[start : at + 1]).decode("utf-8", errors="replace")
        out.append(ParseError(errors.json_stray(token)))
        self._reset(at + 1)

    def _limit(self, desc: str, out: list[Item]) -> None:
        out.append(ParseError(desc, fatal=True))
        self.fatal = True
        self._buf.clear()
        self._pos = 0

    def _open_string(self, at: int, quote: int) -> None:
        self._quote = quote
        self._string_start = at

    def feed(self, data: bytes) -> list[Item]:
        """Consume ``data``; return the values and errors it completed, in input order."""
        out: list[Item] = []
        if self.fatal:
            return out
        self._buf += data
        buf = self._buf
        while not self.fatal:
            if self._pos > self.max_size:
                self._limit(errors.TOKEN_SIZE_LIMIT, out)
                break
            if self._quote:
                m = _INSIDE[self._quote].search(buf, self._pos)
                if m is None:
                    self._pos = len(buf)
                    if self._pos > self.max_size:
                        continue
                    break
                i = m.start()
                c = buf[i]
                if c == self._quote:  # closing quote
                    self._quote = 0
                    self._pos = i + 1
                    if self._depth == 0:  # a top-level string
                        self._emit(i + 1, out)
                elif c == 0x5C:  # backslash: skip the escaped byte
                    if i + 1 >= len(buf):
                        self._pos = i
                        break
                    self._pos = i + 2
                else:
                    self._stray(i, out)
            elif self._scalar:
                m = _SCALAR_END.search(buf, self._pos)
                if m is None:
                    self._pos = len(buf)
                    if self._pos > self.max_size:
                        continue
                    break
                self._emit(m.start(), out)
            elif self._depth == 0:
                i = 0
                while i < len(buf) and buf[i] in _WS:
                    i += 1
                if i:
                    del buf[:i]
                if not buf:
                    break
                c = buf[0]
                self._pos = 1
                if c in b"{[":
                    self._depth = 1
                elif c in b"\"'":
                    self._open_string(0, c)
                elif c in b"}]:,":
                    # QEMU parses a lone closing token and finds no value
                    out.append(ParseError(errors.json_parse_error("expecting value")))
                    self._reset(1)
                elif c < 0x20 or c >= 0x7F:
                    self._stray(0, out)
                else:
                    self._scalar = True
            else:
                m = _OUTSIDE.search(buf, self._pos)
                if m is None:
                    self._pos = len(buf)
                    if self._pos > self.max_size:
                        continue
                    break
                i = m.start()
                c = buf[i]
                self._pos = i + 1
                if c in b"{[":
                    self._depth += 1
                    if self._depth > self.max_depth:
                        self._limit(errors.NESTING_LIMIT, out)
                elif c in b"}]":
                    self._depth -= 1
                    if self._depth == 0:
                        self._emit(i + 1, out)
                elif c in b"\"'":
                    self._open_string(i, c)
                else:
                    self._stray(i, out)
        return out
