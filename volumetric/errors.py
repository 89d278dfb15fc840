"""The one exception type for errors a user can cause (bad paths, scans, configs, checkpoints).

The command-line tools turn it into a single line on stderr and exit status 2.
"""

from __future__ import annotations


class VolumetricError(Exception):
    """A problem with the user's input, not a bug: reported as one line, exit status 2."""


def first_line(error: BaseException, default: str | None = None) -> str:
    """The first line of a library's error message, for a one-line report; ``default`` (or the
    exception's type name) when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else default or type(error).__name__
