"""The command lines in shell text (cluster launcher commands, container scripts), for tests
that parse each with the real CLI it names (`meshd`, `ray`)."""

from __future__ import annotations

import os
import shlex

_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ">", ">>", "<", ";;", "|&"}


def logical_lines(script: str) -> list[str]:
    """`script`'s lines with backslash continuations joined and comments dropped."""
    out, cur = [], ""
    for raw in script.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        if cur.strip() and not cur.lstrip().startswith("#"):
            out.append(cur.strip())
        cur = ""
    return out


def commands(script: str, program: str) -> list[list[str]]:
    """Every simple command in `script` whose program's basename is `program`, as its argv
    after the program (up to the next operator or redirection), in order. Environment
    assignments before the program (`A=b prog ...`) are skipped."""
    found = []
    for line in logical_lines(script):
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        tokens = list(lex)
        start = True  # at a command position
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            if tok in _OPERATORS:
                start = tok not in (">", ">>", "<")
                i += 1 if start else 2  # a redirection's target is no command
                continue
            if start and not tok.startswith("-") and tok.partition("=")[1] and \
                    tok.partition("=")[0].isidentifier():
                i += 1  # VAR=value before the program
                continue
            if start and os.path.basename(tok) == program:
                j = i + 1
                while j < len(tokens) and tokens[j] not in _OPERATORS:
                    j += 1
                found.append(tokens[i + 1:j])
                i = j
                continue
            start = tok in ("then", "do", "else", "exec", "until", "while", "if", "!", "{")
            i += 1
    return found
