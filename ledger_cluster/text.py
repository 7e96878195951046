"""Client input shown back in errors and logs."""

from __future__ import annotations

# An error echoes at most this many characters of any input: a 4 MiB malformed id must not come
# back as a 4 MiB error message (or land whole in a log line).
ECHOED_INPUT_CHARACTERS_MAX = 64


def escaped(text: str) -> str:
    """At most ECHOED_INPUT_CHARACTERS_MAX characters of `text`, with every control or non-ASCII
    character escaped, so an echo is one printable line (for error metadata)."""
    return text[:ECHOED_INPUT_CHARACTERS_MAX].encode("unicode_escape").decode("ascii")


def echo(text: str) -> str:
    """`text` quoted for an error message: escaped, cut, and how long it was when it was cut."""
    shown = escaped(text).replace('"', '\\"')
    if len(text) > ECHOED_INPUT_CHARACTERS_MAX:
        return f'"{shown}"... ({len(text)} characters)'
    return f'"{shown}"'
