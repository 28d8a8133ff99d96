"""A task item (`Problem`) and the errors a data source can raise."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Problem:
    """One task item. `question` is the raw problem text (also the teacher's plain
    context); `gold` is the reference answer; `solution` a worked solution if known.
    `messages`: a chat to prompt with instead of `question` (custom data in chat form; its
    last message is the user's and holds `question`)."""

    id: str
    question: str
    gold: str
    solution: str | None = None
    messages: list[dict] | None = None


class MalformedRowsWarning(UserWarning):
    """Some rows of a data source were skipped."""


class DataError(ValueError):
    """A data source that cannot be used; the message is one line naming the file."""
