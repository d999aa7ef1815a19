"""The one error family for mistakes a user can fix; the CLI prints its message as one line."""

import difflib
from collections.abc import Iterable


class TuneFactoryError(Exception):
    """A user-fixable problem: the message says what was wrong, where, and what to do."""


class RecipeError(TuneFactoryError):
    """A recipe key is unknown, mistyped, or combined with an incompatible option."""


class DataError(TuneFactoryError):
    """A dataset file or row cannot be read or aligned."""


class ModelError(TuneFactoryError):
    """A model source cannot be found or loaded."""


def read_utf8(path, what: str, error: type[TuneFactoryError]) -> str:
    """A UTF-8 text file's content; other bytes are a user error naming the file and the byte offset."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start : exc.start + 1]
        raise error(f"{path}: {what} is not UTF-8 text (byte {exc.start} is {bad!r})") from None


def did_you_mean(value: str, known: Iterable[str]) -> str:
    """"; did you mean 'x'?" for the closest known name to a mistyped one, or "" when none is close."""
    match = difflib.get_close_matches(value, list(known), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""
