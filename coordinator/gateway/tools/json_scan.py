"""`ObjectScanner`: where a JSON object at the start of a growing text ends.

Only the structure is followed (strings with their escapes, bracket depth), so a `</tool_call>`
inside a string does not end the object; `json.loads` of the found slice checks the rest. A
`<` outside a string cannot occur in JSON, so a block that is missing a closing brace is found
malformed at its end marker instead of swallowing the rest of the output. Each call resumes
where the last one stopped: the text is scanned once, however it is split.
"""

from __future__ import annotations

import re

NEED_MORE = -1
MALFORMED = -2

_STRUCTURE = re.compile(r'["{}\[\]<]')
_IN_STRING = re.compile(r'["\\]')
_NON_SPACE = re.compile(r"\S")


class ObjectScanner:
    __slots__ = ("_depth", "_in_string", "_pos")

    def __init__(self) -> None:
        self._pos = 0
        self._depth = 0
        self._in_string = False

    def scan(self, text: str) -> int:
        """The index just past the object's closing brace, `NEED_MORE`, or `MALFORMED`.

        `text` must be the previous call's text with more appended. Leading whitespace is
        allowed; anything else before the `{` is malformed."""
        pos, depth, in_string = self._pos, self._depth, self._in_string
        if depth == 0:
            m = _NON_SPACE.search(text, pos)
            if m is None:
                self._pos = len(text)
                return NEED_MORE
            if m.group() != "{":
                return MALFORMED
            pos, depth = m.end(), 1
        n = len(text)
        while pos < n:
            if in_string:
                m = _IN_STRING.search(text, pos)
                if m is None:
                    pos = n
                elif m.group() == '"':
                    pos, in_string = m.end(), False
                elif m.end() < n:
                    pos = m.end() + 1  # the escaped character, whatever it is
                else:
                    pos = m.start()  # the escaped character has not arrived yet
                    break
                continue
            m = _STRUCTURE.search(text, pos)
            if m is None:
                pos = n
                break
            c, pos = m.group(), m.end()
            if c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return pos
            else:
                return MALFORMED
        self._pos, self._depth, self._in_string = pos, depth, in_string
        return NEED_MORE
