"""Validation of the names that become parts of SQL identifiers.

Store, aggregated-stream and subscription names are spliced into table,
function and channel names, so they are checked here, before any SQL exists.
"""

from __future__ import annotations

import re

from depeche_nb.core.errors import InvalidIdentifierError, InvalidStreamNameError, InvalidWildcardError

# Derived names add prefixes/suffixes; PostgreSQL truncates identifiers at 63
# bytes, which would silently make two long names collide.
MAX_NAME_LENGTH = 40
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")


def validate_name(name: object, what: str = "name") -> str:
    """Return `name` if it is a lowercase SQL identifier, else raise `InvalidIdentifierError`."""
    if not isinstance(name, str):
        raise InvalidIdentifierError(f"{what} must be a str, got {type(name).__name__}")
    if not name:
        raise InvalidIdentifierError(f"{what} must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidIdentifierError(
            f"{what} {name!r} is {len(name)} characters long; at most {MAX_NAME_LENGTH} are allowed"
        )
    if not _IDENTIFIER.fullmatch(name):
        raise InvalidIdentifierError(
            f"{what} {name!r} is not a valid identifier: use lowercase letters, digits and "
            "underscores, starting with a letter or underscore"
        )
    return name


MAX_STREAM_LENGTH = 255


def validate_stream(stream: object) -> str:
    """Stream names are free text (passed as parameters), but must be a non-empty str."""
    if not isinstance(stream, str):
        raise TypeError(f"stream must be a str, got {type(stream).__name__}")
    if not stream:
        raise InvalidStreamNameError("stream must not be empty")
    if len(stream) > MAX_STREAM_LENGTH:
        raise InvalidStreamNameError(
            f"stream name is {len(stream)} characters long; at most {MAX_STREAM_LENGTH} are allowed"
        )
    problem = unstorable_text_problem(stream)
    if problem is not None:
        raise InvalidStreamNameError(f"stream name {stream!r} {problem}")
    return stream


def unstorable_text_problem(text: str) -> str | None:
    """Why PostgreSQL cannot store `text` (it refuses NUL characters, and UTF-8, the only
    encoding we connect with, has no encoding for a lone surrogate), or None."""
    if "\x00" in text:
        return "contains a NUL character"
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a lone surrogate ({text[exc.start]!r} at index {exc.start})"
    return None


def validate_wildcard(stream_wildcard: object) -> str:
    """A SQL LIKE pattern over stream names (passed as a parameter, so any text is safe)."""
    if not isinstance(stream_wildcard, str):
        raise TypeError(f"stream_wildcard must be a str, got {type(stream_wildcard).__name__}")
    problem = unstorable_text_problem(stream_wildcard)
    if problem is not None:
        raise InvalidWildcardError(f"stream wildcard {stream_wildcard!r} {problem}")
    # Backslash is LIKE's escape character: an unpaired one at the end escapes nothing and
    # PostgreSQL rejects the pattern on every query that uses it.
    trailing = len(stream_wildcard) - len(stream_wildcard.rstrip("\\"))
    if trailing % 2:
        raise InvalidWildcardError(
            f"stream wildcard {stream_wildcard!r} ends with an unpaired backslash (LIKE's escape "
            "character); write a literal backslash as two"
        )
    return stream_wildcard


def check_positive_int(what: str, value: object) -> int:
    """Batch sizes and step limits: an int >= 1 (bool is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value
