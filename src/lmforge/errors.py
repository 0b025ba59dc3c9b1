"""The one exception type for user mistakes.

Anything a user can cause (a bad flag, a missing file, a corrupt weight file) raises
`LmforgeError` with a message that says what is wrong and what to do. The CLI prints
that one line and exits non-zero; everything else is a bug and keeps its traceback.
"""


class LmforgeError(Exception):
    """A user-facing error: the message is shown as-is, without a traceback."""
