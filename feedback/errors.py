"""The one base class for mistakes a user can fix.

The CLI prints a ``UserError`` as one line and exits with status 2; anything
else is a bug and keeps its traceback. It lives in ``feedback`` because that
is the layer every other package may import.
"""


class UserError(Exception):
    """Bad input, a missing file or package, a wrong setting: say what to fix."""
