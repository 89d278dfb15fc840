"""Errors a user can cause, as distinct from bugs.

`VolumetricError` (and its `ConfigError` subclass) is a problem with the user's input: a bad
path, scan, config or checkpoint. The command-line tools report it as one line and exit status 2.
Any other exception reaching them is a bug in volumetric or a library it calls, and is reported as
one, with exit status 70 (EX_SOFTWARE) and a pointer to ``--debug`` for the traceback.
"""

from __future__ import annotations


class VolumetricError(Exception):
    """A problem with the user's input, not a bug: reported as one line, exit status 2."""


class ConfigError(VolumetricError):
    """A config value that cannot be used; the message names the key (``config train.lr ...``)."""


def first_line(error: BaseException, default: str | None = None) -> str:
    """The first line of a library's error message, for a one-line report; ``default`` (or the
    exception's type name) when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else default or type(error).__name__
