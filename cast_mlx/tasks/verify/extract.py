"""Answer extraction: the text after the last `####`, the content of the last
`\\boxed{...}` (or `\\fbox`) with brace matching, or the last number in the text.
"""

from __future__ import annotations

import re

from cast_mlx.tasks.verify.limits import EXTRACT_TAIL_CHARS, MAX_ANSWER_CHARS

ANSWER_FORMATS = ("hash", "boxed", "last_number")

_BOX_COMMANDS = ("\\boxed", "\\fbox")

# A number in running text: 1,234.5 / -7 / .5 / 3/4 / 12%, the sign only when the minus
# is not part of "5-3" (a minus right after a word character or ")" is an operator).
_NUMBER_IN_TEXT = re.compile(
    r"(?:(?<![\w)])-)?"
    r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:/\d+)?|\.\d+)"
    r"%?"
)


def match_braces(text: str, open_index: int) -> int | None:
    """Index of the `}` closing the `{` at `open_index`, or None if unbalanced.

    Escaped braces (`\\{`, `\\}`) do not count.
    """
    depth = 0
    i = open_index
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (also `\\boxed 5`), else None.

    The last box wins; if it is unbalanced (e.g. cut off by the length limit) there is no
    answer, rather than a guess from an earlier box.
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    i = start + len(cmd)
    if i < len(text) and text[i] == "{":
        end = match_braces(text, i)
        if end is None:
            return None
        content = text[i + 1 : end]
    elif i < len(text) and text[i] == " ":
        # `\boxed 5`: the next whitespace-delimited token.
        m = re.match(r" +([^\s$]+)", text[i : i + MAX_ANSWER_CHARS])
        if not m:
            return None
        content = m.group(1)
    else:
        return None
    content = content.strip()
    return content or None


_QUOTES = "\"'`“”‘’«»"


def _quoted_marker(text: str, idx: int) -> bool:
    """Whether the `####` at `idx` sits in quotes (`"####"`): the marker mentioned, not used."""
    end = idx + 4
    if end >= len(text) or text[end] not in _QUOTES:  # first: inside a run of `#` this is cheap
        return False
    start = idx
    while start > 0 and text[start - 1] == "#":
        start -= 1
    return start > 0 and text[start - 1] in _QUOTES


def extract_hash(text: str) -> str | None:
    """The rest of the line after the last `####` that has something after it. A quoted
    `"####"` is skipped: a completion that writes 'my answer goes after "####"' names the
    marker, and what follows it is prose, not an answer."""
    idx = text.rfind("####")
    while idx >= 0:
        if not _quoted_marker(text, idx):
            line = text[idx + 4 : idx + 4 + MAX_ANSWER_CHARS + 1].split("\n", 1)[0]
            answer = line.strip().lstrip("#").strip().strip("*").strip().rstrip(".").strip()
            if answer:
                return answer
        idx = text.rfind("####", 0, idx)
    return None


def extract_last_number(text: str) -> str | None:
    """The last number of the text (searched in its last `EXTRACT_TAIL_CHARS` characters)."""
    tail = text[-EXTRACT_TAIL_CHARS:]
    last = None
    for match in _NUMBER_IN_TEXT.finditer(tail):
        last = match
    return last.group(0) if last else None


def extract_answer(text: str, fmt: str) -> str | None:
    """Extract the answer of a completion in format `fmt` ("hash", "boxed", "last_number")."""
    if fmt == "hash":
        return extract_hash(text)
    if fmt == "boxed":
        return extract_boxed(text)
    if fmt == "last_number":
        return extract_last_number(text)
    raise ValueError(f"answer format must be one of {ANSWER_FORMATS}, got {fmt!r}")


def lenient_answer(text: str, fmt: str) -> str | None:
    """The first answer found in the order: `fmt`, the other marked format, last number.

    Lenient scoring uses this one answer (not "any of them"), so a completion cannot
    collect reward by writing several different answers.
    """
    order = {
        "hash": ("hash", "boxed", "last_number"),
        "boxed": ("boxed", "hash", "last_number"),
        "last_number": ("last_number", "boxed", "hash"),
    }[fmt]
    for f in order:
        answer = extract_answer(text, f)
        if answer is not None:
            return answer
    return None
