"""The one exception type for errors a user can cause (bad paths, scans, configs, checkpoints).

The command-line tools turn it into a single line on stderr and exit status 2.
"""


class VolumetricError(Exception):
    """A problem with the user's input, not a bug: reported as one line, exit status 2."""
